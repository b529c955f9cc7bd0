"""A JPEG's crop decoded alone (vitkit.data._jpeg): the same pixels as Pillow's whole decode,
training crops within a few levels of Pillow's path, and everything unusual left to Pillow."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.data.preprocess import UnreadableImage, load_image
from vitkit.data.stream import RandomResizedCrop

jpeg = pytest.importorskip("vitkit.data._jpeg")


def test_built_wherever_libjpeg_headers_are():
    # The extension is optional; where the headers are installed (as here and in CI) a missing
    # build would silently leave training on the slow path.
    if not Path("/usr/include/jpeglib.h").exists():
        pytest.skip("no libjpeg headers")
    assert jpeg.decode_region is not None


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB", **save) -> bytes:
    """A JPEG with smooth fields, edges and grain, as a photo has."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(7 * x + c) * np.cos(5 * y - c) for c in range(3)], -1)
    pixels = (127 + 100 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    pixels[height // 3 : height // 2, width // 4 : width // 2] = (250, 20, 40)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, "JPEG", quality=90, **save)
    return out.getvalue()


@pytest.mark.parametrize(
    "save", [{}, {"subsampling": 0}, {"subsampling": 1}, {"progressive": True}, {"mode": "L"}]
)
def test_region_pixels_equal_the_whole_decode(save):
    mode = save.pop("mode", "RGB")
    data = photo(301, 227, mode=mode, **save)
    rng = random.Random(0)
    for denom in (1, 2, 4):
        im = Image.open(io.BytesIO(data))
        im.draft(None, (301 // denom, 227 // denom))
        whole = np.asarray(im)
        h, w = whole.shape[:2]
        pixels, width, height, bands, left = jpeg.decode_region(data, denom, 0, 0, w, h)
        assert (width, height, bands, left) == (w, h, 3 if whole.ndim == 3 else 1, 0)
        assert np.array_equal(np.frombuffer(pixels, np.uint8).reshape(whole.shape), whole)
        for _ in range(10):
            x, y = rng.randrange(w - 4), rng.randrange(h - 4)
            cw, ch = rng.randint(3, w - x), rng.randint(1, h - y)
            pixels, width, height, bands, left = jpeg.decode_region(data, denom, x, y, cw, ch)
            assert left <= x and x + cw <= left + width and height == ch
            region = np.frombuffer(pixels, np.uint8).reshape(ch, width, *whole.shape[2:])
            # The outermost columns of a region inside the image lack their neighbours'
            # colour (upsampled chroma): the decoder's callers never use them.
            lo, hi = int(left > 0), width - int(left + width < w)
            assert np.array_equal(region[:, lo:hi], whole[y : y + ch, left + lo : left + hi])


def test_training_crops_match_pillows_path(tmp_path):
    crop = RandomResizedCrop((0.08, 1.0), (3 / 4, 4 / 3))
    for i, (size, save) in enumerate(
        [((500, 375), {}), ((1200, 900), {}), ((640, 480), {"progressive": True})]
    ):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(photo(*size, seed=i, **save))
        for k in range(5):
            box = crop.box(random.Random(k))
            fast = load_image(path, 3, 224, crop=box, region_decode=True).int()
            slow = load_image(path, 3, 224, crop=box).int()
            assert (fast - slow).abs().max() <= 8 and (fast - slow).abs().float().mean() < 0.5
            grey = load_image(path, 1, 96, crop=box, region_decode=True).int()
            assert (grey - load_image(path, 1, 96, crop=box).int()).abs().max() <= 8


def test_what_it_does_not_decode_is_left_to_pillow(tmp_path):
    box = RandomResizedCrop((0.3, 0.5), (3 / 4, 4 / 3)).box(random.Random(1))
    # CMYK, and a photo turned by its EXIF orientation: Pillow's path, pixel for pixel.
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(io.BytesIO(photo(200, 150))).convert("CMYK").save(cmyk, "JPEG")
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(io.BytesIO(photo(200, 150))).save(turned, "JPEG", exif=exif)
    for path in (cmyk, turned):
        fast = load_image(path, 3, 64, crop=box, region_decode=True)
        assert fast.equal(load_image(path, 3, 64, crop=box))
    # Truncated: libjpeg warns, Pillow decides, and it is unreadable either way.
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo(200, 150)[:2000])
    with pytest.raises(UnreadableImage, match="cut.jpg"):
        load_image(cut, 3, 64, crop=box, region_decode=True)


def test_bad_calls_raise_instead_of_crashing():
    data = photo(64, 48)
    with pytest.raises(ValueError, match="denom must be"):
        jpeg.decode_region(data, 3, 0, 0, 8, 8)
    for region in ((60, 0, 8, 8), (0, 0, 0, 8), (-1, 0, 8, 8), (0, 40, 8, 9)):
        with pytest.raises(ValueError, match="not inside the image"):
            jpeg.decode_region(data, 1, *region)
    rng = np.random.default_rng(0)
    for _ in range(20):  # corrupt data: an error, never a crash
        broken = bytearray(data)
        for i in rng.integers(2, len(data), 8):
            broken[i] = rng.integers(0, 256)
        with contextlib.suppress(ValueError):
            jpeg.decode_region(bytes(broken), 1, 0, 0, 64, 48)
        with contextlib.suppress(ValueError):
            jpeg.decode_region(bytes(broken), 2, 9, 5, 20, 12)
    with pytest.raises(ValueError):
        jpeg.decode_region(b"not a jpeg", 1, 0, 0, 8, 8)
