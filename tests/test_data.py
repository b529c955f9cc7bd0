import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import (
    AugmentConfig,
    DatasetError,
    ImageDataset,
    TrainTransform,
    dataset_stats,
    load_dataset,
    load_digits,
    load_idx_dir,
    load_image,
    load_image_folder,
    mix,
    read_idx,
    split_image_folder,
    stratified_split,
    to_float,
)
from vitkit.data import idx as idx_module
from vitkit.data.transforms import rand_augment, random_crop, random_erasing, random_hflip

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray, code: int | None = None) -> bytes:
    code = code if code is not None else _CODES[array.dtype.str[1:]]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_split(
    directory: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


def mnist_like(n: int = 12, h: int = 28, w: int = 28, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


# -- IDX --------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = mnist_like()
    write_split(tmp_path, "train", images, labels, gz=gz)
    test_images, test_labels = mnist_like(5, 9, 7, seed=1)  # any H x W, not only 28 x 28
    write_split(tmp_path, "test", test_images, test_labels, gz=gz)

    ds = load_idx_dir(tmp_path, "train")
    assert ds.images.shape == (12, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.classes == [str(i) for i in range(10)]
    test = load_idx_dir(tmp_path, "test", classes=list("abcdefghij"))
    assert test.images.shape == (5, 1, 9, 7) and test.classes[0] == "a"
    assert torch.equal(test.images[:, 0], torch.from_numpy(test_images))


@pytest.mark.parametrize("dtype", [">i2", ">i4", ">f4", ">f8", "i1"])
def test_read_idx_multibyte_types_are_big_endian(tmp_path, dtype):
    values = np.array([[-3, 1, 2], [300, -70, 5]]).astype(dtype)
    out = read_idx(write_idx(tmp_path / "x.idx", values))
    assert out.shape == (2, 3) and out.dtype.isnative
    np.testing.assert_array_equal(out, values)


def test_truncated_and_oversized_files_rejected(tmp_path):
    data = idx_bytes(mnist_like()[0])
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(DatasetError, match=r"short: truncated.*12x28x28"):
        read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(data + b"\x00")
    with pytest.raises(DatasetError, match="long: has trailing bytes"):
        read_idx(tmp_path / "long")
    (tmp_path / "head").write_bytes(data[:9])
    with pytest.raises(DatasetError, match="truncated IDX header"):
        read_idx(tmp_path / "head")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(DatasetError, match=r"cut.gz: not a valid gzip file"):
        read_idx(tmp_path / "cut.gz")


def test_bad_magic_and_type_rejected(tmp_path):
    data = idx_bytes(mnist_like()[0])
    (tmp_path / "magic").write_bytes(b"\x01" + data[1:])
    with pytest.raises(DatasetError, match=r"magic: not an IDX file \(magic number 01000803\)"):
        read_idx(tmp_path / "magic")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(tmp_path / "png")
    (tmp_path / "type").write_bytes(data[:2] + b"\x0a" + data[3:])
    with pytest.raises(DatasetError, match="unsupported IDX data type code 0x0a"):
        read_idx(tmp_path / "type")


def test_mislabelled_files_rejected(tmp_path):
    images, labels = mnist_like()
    write_split(tmp_path / "count", "train", images, labels[:-1])
    with pytest.raises(DatasetError, match="11 labels for the 12 images"):
        load_idx_dir(tmp_path / "count")
    write_split(tmp_path / "range", "train", images, labels)
    with pytest.raises(DatasetError, match=r"label 2 \(image 2\) is outside 0..1"):
        load_idx_dir(tmp_path / "range", classes=["a", "b"])
    write_split(tmp_path / "negative", "train", images, labels.astype(np.int8) - 1)
    with pytest.raises(DatasetError, match="label -1"):
        load_idx_dir(tmp_path / "negative")
    write_split(tmp_path / "flat", "train", images.reshape(12, -1), labels)
    with pytest.raises(DatasetError, match=r"expected uint8 images \(N, H, W\)"):
        load_idx_dir(tmp_path / "flat")
    (tmp_path / "count" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="neither train-labels-idx1-ubyte.gz nor"):
        load_idx_dir(tmp_path / "count")


def test_known_dataset_checksums_and_own_idx_dirs(tmp_path):
    images, labels = mnist_like()
    for gz in (True, False):  # compressed or not, a known dataset's content is checked
        write_split(tmp_path / f"gz{gz}", "train", images, labels, gz=gz)
        with pytest.raises(DatasetError, match="checksum mismatch.*not the original.*--data DIR"):
            load_dataset("mnist", data_dir=tmp_path / f"gz{gz}")
    # IDX files of one's own load by their directory: classes from both splits' labels.
    own = tmp_path / "own"
    write_split(own, "train", images, labels % 4, gz=False)
    write_split(own, "test", images[:5], labels[:5] % 4 + 2)  # labels 2..5
    train, test = load_dataset(str(own), "train"), load_dataset(str(own), "val")
    assert len(train) == 12 and len(test) == 5 and train.name == "own"
    assert train.classes == test.classes == [str(d) for d in range(6)]
    assert test.labels.tolist() == (labels[:5] % 4 + 2).tolist()
    assert load_dataset(str(own), "test", image_size=32).images.shape == (5, 1, 32, 32)
    labels[3] = 10  # out of range for the classes given
    write_split(tmp_path / "bad", "train", images, labels, gz=False)
    with pytest.raises(DatasetError, match="label 10"):
        load_idx_dir(tmp_path / "bad", classes=list("abc"))


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_module, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert str(tmp_path / "env" / "fashion-mnist") in message
    assert str(tmp_path / "system" / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    with pytest.raises(DatasetError, match=r"(?s)mnist not found.*--data-dir"):
        load_dataset("mnist", "test")
    images, labels = mnist_like()
    write_split(tmp_path / "env" / "mnist", "test", images, labels, gz=False)
    found = tmp_path / "env" / "mnist" / "t10k-images-idx3-ubyte"  # through $VITKIT_DATA,
    with pytest.raises(DatasetError, match=f"{found}: checksum mismatch"):  # and checked
        load_dataset("mnist", "test")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist(tmp_path):
    train = load_dataset("fashion-mnist", "train")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.classes == FASHION_CLASSES and train.name == "fashion-mnist"
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    test = load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean, std = dataset_stats(train)
    assert mean[0] == pytest.approx(0.2860, abs=1e-3) and std[0] == pytest.approx(0.3530, abs=1e-3)

    # Recompressed, the content still matches the published checksum...
    labels = gzip.decompress((FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels, compresslevel=1))
    shutil.copy(FASHION / "t10k-images-idx3-ubyte.gz", tmp_path)
    assert torch.equal(load_dataset("fashion-mnist", "test", data_dir=tmp_path).labels, test.labels)
    # ...and one changed label does not.
    changed = bytearray(labels)
    changed[100] = (changed[100] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(changed)))
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)

    # An uncompressed copy loaded by its directory is recognised by content: names, checks.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "t10k-labels-idx1-ubyte").write_bytes(labels)
    images = gzip.decompress((FASHION / "t10k-images-idx3-ubyte.gz").read_bytes())
    (copy / "t10k-images-idx3-ubyte").write_bytes(images)
    same = load_dataset(str(copy), "test")
    assert same.name == "fashion-mnist" and same.classes == FASHION_CLASSES
    assert torch.equal(same.images, test.images)
    changed_images = bytearray(images)
    changed_images[-1] ^= 1
    (copy / "t10k-images-idx3-ubyte").write_bytes(bytes(changed_images))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte: checksum mismatch"):
        load_dataset(str(copy), "test")


# -- digits -----------------------------------------------------------------------------------
def test_digits_split():
    pytest.importorskip("sklearn")
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797 and len(test) == pytest.approx(0.2 * 1797, abs=5)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and train.classes == [str(d) for d in range(10)]
    # Stratified: every class is held out at about 20%.
    held, kept = torch.bincount(test.labels), torch.bincount(train.labels)
    fraction = held / (held + kept)
    assert torch.allclose(fraction, torch.full((10,), 0.2), atol=0.01)
    # Reproducible, and together exactly the whole dataset.
    again = load_digits("test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    from sklearn.datasets import load_digits as sklearn_digits

    everything = np.rint(sklearn_digits().images * 255 / 16).astype(np.uint8)
    rows = sorted(map(bytes, everything.reshape(1797, -1)))
    both = torch.cat([train.images, test.images]).reshape(1797, -1).numpy()
    split_rows = sorted(map(bytes, both))
    assert rows == split_rows
    with pytest.raises(DatasetError, match="'train' and 'test'"):
        load_digits("validation")


def test_stratified_split_disjoint_and_reproducible():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = stratified_split(labels, 0.2, seed=3)
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == list(range(100))
    assert torch.bincount(labels[held]).tolist() == [10, 6, 4]
    assert torch.equal(held, stratified_split(labels, 0.2, seed=3)[1])
    assert not torch.equal(held, stratified_split(labels, 0.2, seed=4)[1])


def test_load_dataset_converts_digits():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", "val", image_size=16, channels=3)
    assert ds.images.shape == (len(load_digits("test")), 3, 16, 16)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


# -- image folders ------------------------------------------------------------------------------
def make_folder(root: Path) -> None:
    for name in ("cmyk", "deep", "grey", "palette", "rgba", "rotated"):
        (root / name).mkdir(parents=True)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "cmyk" / "red.tiff")
    deep = np.zeros((16, 16), dtype=np.uint16)
    deep[:, :8], deep[:, 8:] = 65535, 128 * 257
    deep[0, 0] = 10 * 257
    Image.fromarray(deep).save(root / "deep" / "a.png")
    assert Image.open(root / "deep" / "a.png").mode == "I;16"
    Image.new("L", (16, 16), 100).save(root / "grey" / "a.png")
    Image.new("L", (40, 20), 30).save(root / "grey" / "wide.bmp")  # resized and cropped
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(root / "palette" / "a.gif")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :8, 3], rgba[:, 8:12, 3] = 255, 0
    rgba[:, 12:, 3] = 128
    Image.fromarray(rgba).save(root / "rgba" / "a.png")
    # Stored 32 wide x 16 high, top half white; EXIF orientation 6 means "rotate 90 degrees
    # clockwise to display", so the displayed image is 16 x 32 with the white half on the right.
    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "rotated" / "a.jpg", exif=exif, quality=95)
    (root / "grey" / "broken.png").write_bytes(b"not an image at all")
    png = (root / "grey" / "a.png").read_bytes()
    (root / "rgba" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "grey" / "notes.txt").write_text("not an image, ignored")
    (root / "grey" / ".hidden.png").write_bytes(b"ignored")


def test_image_folder_modes_and_skipped_files(tmp_path, capsys):
    make_folder(tmp_path)
    ds = load_image_folder(tmp_path, channels=3, image_size=16)
    assert ds.classes == ["cmyk", "deep", "grey", "palette", "rgba", "rotated"]
    assert ds.images.shape == (7, 3, 16, 16) and ds.labels.tolist() == [0, 1, 2, 2, 3, 4, 5]
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["broken.png", "truncated.png"]
    assert all(reason for _, reason in ds.skipped)
    assert "skipped 2 unreadable image file(s)" in capsys.readouterr().err

    def image(cls: str) -> torch.Tensor:
        return ds.images[ds.labels.tolist().index(ds.classes.index(cls))]

    assert image("cmyk")[:, 0, 0].tolist() == [255, 0, 0]
    deep = image("deep")[0]
    assert deep[1, 0] == 255 and deep[0, 15] == 128 and deep[0, 0] == 10  # scaled, not clipped
    assert (image("grey") == 100).all()
    assert (ds.images[3] == 30).all()  # the 40 x 20 grey image, resized
    assert image("palette")[:, 5, 5].tolist() == [10, 200, 30]
    rgba = image("rgba")
    assert rgba[:, 0, 0].tolist() == [200, 100, 50] and (rgba[:, :, 8:12] == 0).all()
    assert rgba[:, 0, 13].tolist() == [100, 50, 25]  # half transparent, composited on black
    rotated = image("rotated").float()
    assert rotated[:, :, 9:].mean() > 220 and rotated[:, :, :7].mean() < 35

    grey = load_image_folder(tmp_path, channels=1, image_size=8)
    assert grey.images.shape == (7, 1, 8, 8)
    assert grey.images[0, 0, 0, 0] == 76  # red's luma: 0.299 * 255
    capsys.readouterr()


def test_load_image_single(tmp_path):
    make_folder(tmp_path)
    rotated = load_image(tmp_path / "rotated" / "a.jpg", channels=1, image_size=16)
    assert rotated.shape == (1, 16, 16) and rotated.dtype == torch.uint8
    assert rotated[0, :, 9:].float().mean() > 220 and rotated[0, :, :7].float().mean() < 35
    pil = Image.open(tmp_path / "rgba" / "a.png")
    assert torch.equal(load_image(pil, 3, 16), load_image(tmp_path / "rgba" / "a.png", 3, 16))
    assert load_image(tmp_path / "grey" / "wide.bmp", 3, 32).shape == (3, 32, 32)
    with pytest.raises(DatasetError, match=r"broken.png: cannot read image: .+"):
        load_image(tmp_path / "grey" / "broken.png")
    with pytest.raises(DatasetError, match="missing.png: cannot read image"):
        load_image(tmp_path / "missing.png")


def test_folder_without_readable_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="no readable images"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetError, match="no class subfolders"):
        load_image_folder(tmp_path / "a")


def numbered_folder(root: Path, counts: dict[str, int]) -> None:
    """Images whose constant grey value identifies them: 1, 2, 3, ..."""
    value = 1
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), value).save(root / cls / f"{i}.png")
            value += 1


def test_folder_split_by_fraction(tmp_path):
    numbered_folder(tmp_path, {"a": 20, "b": 10})
    train, val = split_image_folder(tmp_path, val_fraction=0.2, seed=1, channels=1, image_size=8)
    assert torch.bincount(val.labels).tolist() == [4, 2] and len(train) == 24
    ids = {int(v) for v in train.images[:, 0, 0, 0]}, {int(v) for v in val.images[:, 0, 0, 0]}
    assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == set(range(1, 31))
    again = load_dataset(str(tmp_path), "val", image_size=8, channels=1, val_fraction=0.2, seed=1)
    assert torch.equal(again.images, val.images) and again.classes == ["a", "b"]


def test_folder_with_split_subfolders(tmp_path):
    numbered_folder(tmp_path / "train", {"cat": 3, "dog": 3, "eel": 2})
    numbered_folder(tmp_path / "val", {"dog": 2})
    train = load_dataset(str(tmp_path), "train", image_size=8)
    val = load_dataset(str(tmp_path), "val", image_size=8)
    assert train.classes == val.classes == ["cat", "dog", "eel"] and val.name == tmp_path.name
    assert val.labels.tolist() == [1, 1] and val.images.shape == (2, 3, 8, 8)
    assert len(load_dataset(str(tmp_path), "test", image_size=8)) == 2  # falls back on val/
    numbered_folder(tmp_path / "val", {"fox": 1})
    with pytest.raises(DatasetError, match="'fox'"):
        load_dataset(str(tmp_path), "val", image_size=8)


# -- statistics and transforms -----------------------------------------------------------------
def random_dataset(n: int = 64, c: int = 3, size: int = 12) -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), generator=gen, dtype=torch.uint8)
    images[:, 0] //= 2  # channels with different statistics
    return ImageDataset(images, torch.arange(n) % 10, [str(i) for i in range(10)])


def test_dataset_stats_matches_float_computation():
    ds = random_dataset()
    mean, std = dataset_stats(ds)
    x = ds.images.double() / 255
    assert mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(x.std((0, 2, 3), correction=0).tolist(), abs=1e-12)


def test_eval_preprocessing_normalises():
    from vitkit.config import ViTConfig
    from vitkit.data.preprocess import preprocess

    ds = random_dataset()
    mean, std = dataset_stats(ds)
    cfg = ViTConfig(image_size=ds.image_size, patch_size=1, mean=mean, std=std)
    x = preprocess(ds.images, cfg)
    assert x.dtype == torch.float32 and x.shape == ds.images.shape
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-5)
    assert preprocess(ds.images, cfg.replace(image_size=24)).shape == (64, 3, 24, 24)
    white = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    flat = preprocess(white, ViTConfig(image_size=4, patch_size=1, std=(0.25, 0.25, 0.25)))
    assert torch.allclose(flat, torch.full_like(flat, 2.0))
    with pytest.raises(TypeError, match="uint8 or float"):
        to_float(torch.zeros(1, 3, 4, 4, dtype=torch.int64))


FULL = AugmentConfig(
    crop_padding=2,
    random_resized_crop=True,
    hflip=True,
    randaugment_ops=2,
    random_erasing=0.5,
    mixup=0.8,
    cutmix=1.0,
)


def test_train_transform_shapes_and_determinism():
    ds = random_dataset(32, 1, 28)
    t = TrainTransform(FULL, (0.5,), (0.5,), num_classes=10, image_size=32)
    x1, y1 = t(ds.images, ds.labels, torch.Generator().manual_seed(7))
    x2, y2 = t(ds.images, ds.labels, torch.Generator().manual_seed(7))
    x3, _ = t(ds.images, ds.labels, torch.Generator().manual_seed(8))
    assert x1.shape == (32, 1, 32, 32) and x1.dtype == torch.float32
    assert y1.shape == (32, 10) and torch.allclose(y1.sum(1), torch.ones(32))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)

    plain = TrainTransform(AugmentConfig(), (0.5,), (0.5,))
    x, y = plain(ds.images, ds.labels, torch.Generator())
    assert torch.equal(y, ds.labels) and torch.allclose(x, to_float(ds.images) * 2 - 1)
    with pytest.raises(ValueError, match="num_classes"):
        TrainTransform(AugmentConfig(mixup=0.2), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="mix_prob"):
        AugmentConfig(mix_prob=1.5)


def test_random_crop_shifts_content():
    x = to_float(torch.randint(1, 256, (16, 3, 10, 10), dtype=torch.uint8))
    out = random_crop(x, 3, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    offsets = set()
    for i in range(16):
        found = [
            (dy, dx)
            for dy in range(7)
            for dx in range(7)
            if torch.equal(out[i], padded[i, :, dy : dy + 10, dx : dx + 10])
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 4  # each image has its own offset


def test_flip_is_a_flip():
    x = torch.rand(64, 2, 5, 7)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 10 < sum(flipped) < 54


def test_mixup_targets_are_convex_combinations():
    x = torch.rand(32, 3, 8, 8)
    labels = torch.arange(32) % 10
    out, targets = mix(x, labels, 10, torch.Generator().manual_seed(0), mixup=0.4, cutmix=0.0)
    assert targets.shape == (32, 10) and (targets >= 0).all()
    assert torch.allclose(targets.sum(1), torch.ones(32))
    for i in range(32):
        j = 31 - i  # partner: the batch reversed
        if labels[i] != labels[j]:
            lam = targets[i, labels[i]]
            assert targets[i, labels[j]] == pytest.approx(1 - lam.item(), abs=1e-6)
            assert torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)


def test_cutmix_targets_follow_pasted_area():
    x = torch.arange(32, dtype=torch.float32).view(32, 1, 1, 1).expand(32, 1, 16, 16)
    labels = torch.arange(32) % 10
    out, targets = mix(x, labels, 10, torch.Generator().manual_seed(0), mixup=0.0, cutmix=1.0)
    assert torch.allclose(targets.sum(1), torch.ones(32))
    pasted = (out == x.flip(0)).float().mean((1, 2, 3))
    for i in range(32):
        if labels[i] != labels[31 - i]:
            assert targets[i, labels[31 - i]] == pytest.approx(pasted[i].item(), abs=1e-6)
    assert (pasted > 0).sum() > 16


def test_rand_augment_and_erasing():
    x = to_float(torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8))
    out = rand_augment(x, 2, 9, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    changed = (out - x).abs().amax((1, 2, 3)) > 1e-4
    assert changed.sum() > 40  # most images went through at least one non-identity op
    erased = random_erasing(x, 1.0, torch.Generator().manual_seed(0))
    differs = erased != x
    assert differs.any((1, 2, 3)).all()
    # Each erased region is one rectangle, across all channels.
    for d in differs.any(1):
        rows, cols = d.any(1).nonzero().flatten(), d.any(0).nonzero().flatten()
        assert d.sum() == len(rows) * len(cols)
    assert torch.equal(random_erasing(x, 0.0, torch.Generator()), x)
