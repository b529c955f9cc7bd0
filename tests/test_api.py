"""The declared public API: every name in `__all__` is there, and public names that moved can
still be imported from where they were (for one release, with a DeprecationWarning)."""

import importlib
import warnings

import pytest

import vitkit

PACKAGES = [
    "vitkit",
    "vitkit.data",
    "vitkit.export",
    "vitkit.infer",
    "vitkit.model",
    "vitkit.train",
    "vitkit.weights",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_declared_name_exists(name):
    package = importlib.import_module(name)
    assert package.__all__, f"{name} declares no public names"
    missing = [n for n in package.__all__ if not hasattr(package, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"


def test_top_level_api_is_the_documented_one():
    assert {
        "ViT",
        "ViTConfig",
        "PRESETS",
        "create_model",
        "load_model",
        "save_model",
        "load_pretrained",
        "Classifier",
        "evaluate",
        "optimize",
        "CheckpointError",
    } <= set(vitkit.__all__)


def test_the_old_export_path_still_works_with_a_warning():
    import vitkit.export

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.reload(importlib.import_module("vitkit.infer.export"))
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert old.export_onnx is vitkit.export.export_onnx
    assert old.quantize_int8 is vitkit.export.quantize_onnx_int8  # its old name


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("vitkit.infer", "vitkit.evaluate", "evaluate"),
        ("vitkit.infer", "vitkit.evaluate", "EvalReport"),
        ("vitkit.data", "vitkit.data.preprocess", "load_image"),
        ("vitkit.data", "vitkit.data.preprocess", "preprocess"),
        ("vitkit.data", "vitkit.data.preprocess", "normalize"),
        ("vitkit.data", "vitkit.data.preprocess", "to_float"),
        ("vitkit.data", "vitkit.data.dataset", "ImageDataset"),
        ("vitkit.data", "vitkit.data.dataset", "DatasetError"),
        ("vitkit.infer.predict", "vitkit.data.preprocess", "preprocess"),
    ],
)
def test_moved_names_are_reexported_where_they_were(old, new, name):
    assert getattr(importlib.import_module(old), name) is getattr(
        importlib.import_module(new), name
    )
