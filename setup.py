"""The one compiled part: vitkit.data._jpeg, a JPEG region decoder over the system's libjpeg
(Debian: libjpeg62-turbo-dev). Optional: without a compiler or the headers vitkit installs
and decodes every JPEG whole with Pillow, as before."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vitkit.data._jpeg",
            sources=["src/vitkit/data/_jpeg.c"],
            libraries=["jpeg"],
            optional=True,
        )
    ]
)
