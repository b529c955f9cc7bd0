"""Decoding uploads and files: large images reduced before conversion, the pixel limit that
follows the model, multi-frame images read by their first frame, frames and tiles larger than
the image refused before decoding."""

import argparse
import functools
import importlib
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageFile, features

from vitkit import create_model, save_model
from vitkit.cli.serve import add_serve_command
from vitkit.data.preprocess import ImageTooLarge, UnreadableImage, check_pixels, load_image
from vitkit.serve.app import create_app
from vitkit.serve.decode import DEFAULT_MAX_PIXELS, MIN_DEFAULT_MAX_PIXELS, default_max_pixels

# The module, not the function `vitkit.data.preprocess` that the package exports in its place.
pp = importlib.import_module("vitkit.data.preprocess")

LABELS = [f"class {i}" for i in range(10)]
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def small_model():
    model = create_model("Ti/4@28", width=64, depth=2, heads=2, seed=0)
    torch.nn.init.normal_(model.head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(small_model(), tmp_path_factory.mktemp("decode") / "model", labels=LABELS)


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(model_dir)) as c:  # the pixel limit follows the model
        yield c


def upload(client, data: bytes):
    files = {"file": ("image", data, "application/octet-stream")}
    return client.post("/v1/predict", files=files, params={"top_k": 10})


def as_pairs(response) -> list[tuple[str, float]]:
    assert response.status_code == 200, response.text
    return [(row["label"], row["probability"]) for row in response.json()["labels"]]


def assert_same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [label for label, _ in got] == [label for label, _ in want]
    np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-6)


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """An RGB picture with what photos have: smooth shading, sharp-edged shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    a = np.stack([np.sin(x * 7 + 1) * 0.5 + 0.5, np.cos(y * 5) * 0.5 + 0.5, x * y], -1) * 200
    for _ in range(30):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, h / max(w, h)), rng.uniform(0.02, 0.2)
        a[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    a += rng.normal(0, 8, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def in_mode(rgb: np.ndarray, mode: str) -> Image.Image:
    """The picture as an image of `mode`, with whatever that mode takes (alpha, a palette with a
    transparent entry, 16 bits, floats in [0, 1])."""
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, rgb[..., 1]]))
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 2]]), "LA")
    if mode == "P":
        img = Image.fromarray(rgb).quantize(64)
        img.info["transparency"] = 3
        return img
    if mode == "I;16":
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    if mode == "F":
        return Image.fromarray(rgb[..., 0].astype(np.float32) / 255, "F")
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK")
    return Image.fromarray(rgb).convert(mode)


def before(img: Image.Image, channels: int, size: int, interpolation: str) -> torch.Tensor:
    """Decoding as it was before reduction: the whole image converted, then resized at once."""
    img = pp._to_8bit(img).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (size, size):
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        img = img.resize((size, size), RESAMPLE[interpolation], box=box)
    return pp._to_tensor(img)


# -- reduction before conversion ------------------------------------------------------------
@functools.cache
def large_photo() -> np.ndarray:
    return photo(2000, 1500)


MODES = ["L", "RGB", "RGBA", "LA", "P", "I;16", "F", "1", "CMYK"]


@pytest.mark.parametrize("size", [28, pytest.param(224, marks=pytest.mark.slow)])
def test_images_up_to_twice_the_input_size_decode_exactly_as_before(size):
    shapes = [(size, size), (2 * size, 2 * size), (2 * size, size + 3), (size // 2, size // 3)]
    shapes += [(2 * size - 1, 2 * size), (3 * size, size)]
    for w, h in shapes:
        rgb = noise(w * h, (h, w, 3))
        for mode in MODES:
            img = in_mode(rgb, mode)
            for channels in (1, 3):
                for interpolation in RESAMPLE:
                    got = load_image(img, channels, size, interpolation)
                    want = before(img, channels, size, interpolation)
                    assert torch.equal(got, want), (w, h, mode, channels, interpolation)


@pytest.mark.parametrize(
    "mode", ["RGB", *(pytest.param(m, marks=pytest.mark.slow) for m in ("RGBA", "P", "I;16", "F"))]
)
@pytest.mark.slow
def test_a_large_image_decodes_as_before_within_a_small_tolerance(mode):
    # Reducing by whole blocks to >= 2x the input size, then resizing, is what Pillow's own
    # `reducing_gap=2` does: block averages differ from the bicubic filter's weights only in
    # what survives of detail finer than two output pixels, so a level or so at most edges.
    img = in_mode(large_photo(), mode)
    for size, channels in [(224, 3), (224, 1), (28, 3)]:
        got = load_image(img, channels, size).float()
        want = before(img, channels, size, "bicubic").float()
        diff = (got - want).abs()
        assert diff.mean() < 1.5, (mode, size, channels, diff.mean())
        assert torch.quantile(diff.flatten(), 0.99) <= 12, (mode, size, channels)


@pytest.mark.parametrize("mode", ["I;16", "F", "RGBA", "LA", "P", "1", "CMYK"])
def test_conversion_by_strips_gives_the_pixels_of_converting_the_whole_image(mode, monkeypatch):
    # Small strips: many of them, the last one short and ending in a partial block.
    monkeypatch.setattr(pp, "_STRIP_PIXELS", 5000)
    img = in_mode(photo(301, 203), mode)
    for factor in (1, 2, 3, 7):
        for target in ("L", "RGB"):
            got = pp._reduced(img, target, factor, (0, 0, *img.size))
            whole = pp._to_8bit(img).convert(target)
            want = whole.reduce(factor) if factor > 1 else whole
            assert got.size == want.size and got.tobytes() == want.tobytes(), (factor, target)


def test_a_panorama_converts_only_the_centre_square(monkeypatch):
    converted = []
    to_8bit = pp._to_8bit

    def recorded(img: Image.Image) -> Image.Image:
        converted.append(img.size)
        return to_8bit(img)

    monkeypatch.setattr(pp, "_to_8bit", recorded)
    img = in_mode(photo(6000, 200), "I;16")
    got = load_image(img, 1, 28).float()
    assert converted and all(w < 300 for w, _ in converted), converted[:3]
    want = before(img, 1, 28, "bicubic").float()
    assert (got - want).abs().mean() < 1.5


def test_exif_orientation_is_applied_before_reducing():
    # 3000 x 1000 stored, orientation 6 (rotate 90 degrees clockwise): shown 1000 x 3000.
    stored = np.zeros((1000, 3000), np.uint8)
    stored[:500] = 255  # top half white: after rotation, the right half
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), exif=exif)
    img = Image.open(io.BytesIO(data))
    got = load_image(img, 1, 28).float()[0]
    assert got[:, 16:].mean() > 240 and got[:, :12].mean() < 15


MEASURE = """
import resource, sys
from pathlib import Path
from vitkit.data.preprocess import load_image

def high_water_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
start = high_water_mib()
load_image(sys.argv[1], 3, 224)
print(high_water_mib() - start)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_a_16_bit_8000_pixel_png_decodes_in_little_more_than_its_own_size(tmp_path):
    side = 8000
    levels = (np.add.outer(np.arange(side) // 500, np.arange(side) // 700) % 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(levels * 4369).save(path)  # 16 flat levels: a few hundred KB of PNG
    assert Image.open(path).mode == "I;16"
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    growth = float(done.stdout)
    native = side * side * 2 / 2**20  # the decoded 16-bit frame: 122 MiB
    # Converting the whole frame to floats, as before, took 8 times this (977 MiB).
    assert growth < 2.5 * native, f"decoding took {growth:.0f} MiB"


# -- the default pixel limit ----------------------------------------------------------------
def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height grey pixels (no real data)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_the_default_pixel_limit_follows_the_models_input_size(client, model_dir):
    assert MIN_DEFAULT_MAX_PIXELS == 4096 * 4096 and DEFAULT_MAX_PIXELS == 50_000_000
    assert default_max_pixels(28) == default_max_pixels(64) == 4096 * 4096
    assert default_max_pixels(100) == 6400 * 6400
    assert default_max_pixels(224) == default_max_pixels(1024) == 50_000_000
    assert client.get("/v1/model").json()["limits"]["max_pixels"] == 4096 * 4096
    explicit = create_app(model_dir, max_pixels=1000)
    assert explicit.state.service.info["limits"]["max_pixels"] == 1000
    with pytest.raises(ValueError, match="max_pixels"):
        create_app(model_dir, max_pixels=0)

    # A 16-megapixel image is under the limit for a 28-pixel model; a 50-megapixel one is not.
    big = encode(Image.new("L", (4000, 4000)))
    assert upload(client, big).status_code == 200
    refused = upload(client, png_declaring(8000, 6000))
    assert refused.status_code == 413
    assert refused.json()["error"] == (
        "the image is 8000 x 6000 = 48,000,000 pixels, over the limit of 16,777,216"
    )


def test_max_megapixels_defaults_to_the_model():
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    assert parser.parse_args(["serve", "m"]).max_megapixels is None
    assert parser.parse_args(["serve", "m", "--max-megapixels", "2.5"]).max_megapixels == 2.5


# -- multi-frame images ---------------------------------------------------------------------
def frames(n: int = 3) -> list[Image.Image]:
    return [Image.fromarray(noise(100 + i, (40, 40, 3))) for i in range(n)]


def multi_frame(kind: str) -> bytes:
    first, *rest = frames()
    if kind == "GIF":
        return encode(first, "GIF", save_all=True, append_images=rest, duration=100, loop=0)
    if kind == "TIFF":
        return encode(first, "TIFF", save_all=True, append_images=rest)
    if kind == "APNG":
        return encode(first, "PNG", save_all=True, append_images=rest, duration=100)
    return encode(first, "WEBP", save_all=True, append_images=rest, lossless=True)


def frame_png(data: bytes, index: int) -> bytes:
    """Frame `index` of a multi-frame image, as Pillow decodes it, saved as a single PNG."""
    with Image.open(io.BytesIO(data)) as img:
        img.seek(index)
        return encode(img.convert("RGB"))


KINDS = ["GIF", "TIFF", "APNG"]
if features.check("webp"):
    KINDS.append("WEBP")


@pytest.mark.parametrize("kind", KINDS)
def test_a_multi_frame_image_is_read_by_its_first_frame(client, kind, tmp_path):
    data = multi_frame(kind)
    with Image.open(io.BytesIO(data)) as img:
        assert getattr(img, "n_frames", 1) == 3
    first, second = frame_png(data, 0), frame_png(data, 1)
    got = as_pairs(upload(client, data))
    assert_same(got, as_pairs(upload(client, first)))
    assert got != as_pairs(upload(client, second))  # the frames tell apart

    # Files too (vitkit predict, image folders): load_image reads the first frame.
    (tmp_path / "multi").write_bytes(data)
    (tmp_path / "first.png").write_bytes(first)
    (tmp_path / "second.png").write_bytes(second)
    pixels = load_image(tmp_path / "multi", 3, 28)
    assert torch.equal(pixels, load_image(tmp_path / "first.png", 3, 28))
    assert not torch.equal(pixels, load_image(tmp_path / "second.png", 3, 28))


# -- frames and tiles larger than the image -------------------------------------------------
# LZW data of one pixel: minimum code size 2, then one sub-block holding the 3-bit codes
# clear (4), pixel 0, end (5), then the empty sub-block that ends the image.
ONE_PIXEL_LZW = b"\x02\x02\x44\x01\x00"


def image_descriptor(width: int, height: int) -> bytes:
    return b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + ONE_PIXEL_LZW


def gif(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF with a logical screen of `screen` and one frame of `frame`, both (width, height),
    and a two-colour global palette."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    return header + image_descriptor(*frame) + b"\x3b"


@pytest.mark.parametrize("frame", [(9000, 9000), (65535, 65535)])
def test_a_gif_frame_larger_than_its_logical_screen_is_a_413(client, frame, tmp_path):
    data = gif((1, 1), frame)
    assert len(data) < 50
    response = upload(client, data)
    assert response.status_code == 413, response.text
    assert "over the limit" in response.json()["error"]

    path = tmp_path / "screen.gif"
    path.write_bytes(data)
    for limit in (1_000_000, None):
        with pytest.raises(UnreadableImage) as caught:
            load_image(path, 1, 28, max_pixels=limit)
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"{path}: cannot read image: ")
        if limit is not None and frame == (9000, 9000):  # larger ones: Pillow's bomb error
            assert "9000 x 9000 = 81,000,000 pixels, over the limit of 1,000,000" in message


def test_a_huge_later_gif_frame_is_never_decoded(client):
    first = frames(1)[0].quantize(16)
    single = encode(first, "GIF")
    assert single.endswith(b"\x3b")
    data = single[:-1] + image_descriptor(9000, 9000) + b"\x3b"  # a second, giant frame
    assert_same(as_pairs(upload(client, data)), as_pairs(upload(client, single)))


def tiff_ifds(data: bytes) -> list[int]:
    """The offsets of a little-endian TIFF's image file directories."""
    offsets, at = [], struct.unpack("<I", data[4:8])[0]
    while at:
        offsets.append(at)
        (n,) = struct.unpack("<H", data[at : at + 2])
        (at,) = struct.unpack("<I", data[at + 2 + 12 * n : at + 6 + 12 * n])
    return offsets


def test_a_huge_later_tiff_page_is_never_decoded(client):
    data = bytearray(multi_frame("TIFF"))
    first = frame_png(bytes(data), 0)
    second_page = tiff_ifds(bytes(data))[1]
    (n,) = struct.unpack("<H", data[second_page : second_page + 2])
    for i in range(n):
        entry = second_page + 2 + 12 * i
        (tag,) = struct.unpack("<H", data[entry : entry + 2])
        if tag in (256, 257):  # width and height, as LONGs
            data[entry : entry + 12] = struct.pack("<HHII", tag, 4, 1, 100_000)
    with Image.open(io.BytesIO(bytes(data))) as img:
        img.seek(1)
        assert img.size == (100_000, 100_000)
    assert_same(as_pairs(upload(client, bytes(data))), as_pairs(upload(client, first)))


def apng_with_frame_size(frame: int, width: int, height: int) -> bytes:
    """An APNG of three 40 x 40 frames whose frame control chunk number `frame` declares
    width x height instead."""
    data, out, pos, seen = multi_frame("APNG"), bytearray(), 8, 0
    out += data[:8]
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], bytearray(data[pos + 8 : pos + 8 + n])
        if kind == b"fcTL":
            if seen == frame:
                body[4:12] = struct.pack(">II", width, height)
            seen += 1
        out += chunk(kind, bytes(body))
        pos += 12 + n
    return bytes(out)


def test_apng_frames_larger_than_the_image(client):
    first = frame_png(multi_frame("APNG"), 0)
    later = apng_with_frame_size(1, 9000, 9000)  # never read
    assert_same(as_pairs(upload(client, later)), as_pairs(upload(client, first)))
    response = upload(client, apng_with_frame_size(0, 9000, 9000))  # the first: malformed
    assert response.status_code == 422 and response.json()["error"]


def tiled_tiff(size: int, tile: int, pixels: bytes, deflate: bool) -> bytes:
    """A little-endian grey TIFF of size x size pixels, stored as one tile of tile x tile."""
    data = zlib.compress(pixels) if deflate else pixels
    entries = [
        (256, 4, size),  # width
        (257, 4, size),  # height
        (258, 3, 8),  # bits per sample
        (259, 3, 8 if deflate else 1),  # compression: deflate or none
        (262, 3, 1),  # black is zero
        (277, 3, 1),  # samples per pixel
        (322, 4, tile),  # tile width
        (323, 4, tile),  # tile length
        (324, 4, 8 + 2 + 12 * 10 + 4),  # tile offsets: just after the directory
        (325, 4, len(data)),  # tile byte counts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + data


def test_tiff_tiles_over_the_limit_are_refused_before_decoding(client, tmp_path):
    # libtiff decodes a tile at a time into a buffer of the declared tile size: this 16 x 16
    # image's 32768 x 32768 tile would take 1 GiB.
    hostile = tiled_tiff(16, 32768, bytes(64), deflate=True)
    assert len(hostile) < 200
    response = upload(client, hostile)
    assert response.status_code == 413, response.text
    assert "tiles of 32768 x 32768" in response.json()["error"]
    path = tmp_path / "tiles.tiff"
    path.write_bytes(hostile)
    with pytest.raises(UnreadableImage, match=r"tiles of 32768 x 32768 = 1,073,741,824 pixels"):
        load_image(path)

    # Tiles of an ordinary size are read.
    grey = noise(7, (16, 16))
    tiled = tiled_tiff(16, 16, grey.tobytes(), deflate=False)
    assert_same(
        as_pairs(upload(client, tiled)), as_pairs(upload(client, encode(Image.fromarray(grey))))
    )


def test_check_pixels_counts_every_tile():
    img = Image.open(io.BytesIO(encode(Image.new("L", (10, 10)))))
    check_pixels(img, 100)
    with pytest.raises(ImageTooLarge, match="10 x 10 = 100 pixels, over the limit of 99"):
        check_pixels(img, 99)
    # A frame larger than the image, as a GIF's is where Pillow does not grow the image to it.
    img.tile = [ImageFile._Tile("zip", (0, 0, 5000, 5000), 0, "L")]
    with pytest.raises(ImageTooLarge, match="a tile of the image is 5000 x 5000 pixels"):
        check_pixels(img, 1_000_000)
