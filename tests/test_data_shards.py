"""WebDataset shards: packing an image folder, reading it back among several readers, resuming,
hostile shards and manifests, and `vitkit data`."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.cli import main
from vitkit.cli.data import parse_size
from vitkit.data import shards as shards_module
from vitkit.data.dataset import DatasetError
from vitkit.data.inspect import inspect_source
from vitkit.data.preprocess import UnreadableImage, load_image
from vitkit.data.shard_source import open_shards
from vitkit.data.shards import MANIFEST, ShardSet, pack_folder
from vitkit.data.sources import open_source
from vitkit.data.stream import ImageStream

CLASSES = ["cat", "dog", "fish"]
BAD = {"cat/broken.png", "dog/truncated.jpg", "fish/empty.png"}
SHARD_BYTES = 25_000  # a few samples a shard, so that sets have several


def make_folder(root: Path) -> dict[str, tuple[bytes, int]]:
    """3 classes x 8 images of different sizes, PNG and JPEG (one PNG with transparency), a
    corrupt file, a truncated JPEG, a zero-byte file and a text file. Returns the readable
    images as {key: (file bytes, label)}."""
    rng = np.random.default_rng(0)
    images = {}
    for label, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            w, h = 16 + 8 * i, 12 + 4 * label + 2 * i
            pixels = rng.integers(0, 256, (h, w, 4 if i == 7 else 3), dtype=np.uint8)
            path = root / cls / f"img{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(pixels).save(path)
            images[f"{cls}/img{i}"] = (path.read_bytes(), label)
    (root / "cat" / "broken.png").write_bytes(b"not an image at all")
    jpeg = (root / "dog" / "img0.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "fish" / "empty.png").write_bytes(b"")
    (root / "fish" / "notes.txt").write_text("not an image, ignored")
    return images


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, tuple[bytes, int]]]:
    root = tmp_path / "photos"
    return root, make_folder(root)


@pytest.fixture
def packed(tmp_path, folder) -> tuple[Path, dict[str, tuple[bytes, int]]]:
    out = tmp_path / "shards"
    pack_folder(folder[0], out, SHARD_BYTES)
    return out, folder[1]


def read_all(shards: ShardSet, **kwargs) -> list[tuple[str, bytes, int]]:
    return list(shards.samples(kwargs.pop("epoch", 0), **kwargs))


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in `out`: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


def test_pack_then_read_back_every_readable_image(tmp_path, folder):
    root, images = folder
    [result] = pack_folder(root, tmp_path / "out", SHARD_BYTES)
    assert (result.samples, result.written, result.ignored) == (24, result.shards, 1)
    assert result.shards > 3
    assert {path for path, _ in result.skipped} == BAD
    assert dict(result.skipped)["cat/broken.png"].startswith("not an image")
    assert dict(result.skipped)["fish/empty.png"] == "an empty file"

    shards = ShardSet(tmp_path / "out", verify=True)
    assert shards.classes == CLASSES and shards.num_samples == 24
    samples = read_all(shards)
    assert len(samples) == 24
    assert {key: (data, label) for key, data, label in samples} == images
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["complete"] and [s["file"] for s in manifest["shards"]] == [
        f"shards-{i:06d}.tar" for i in range(result.shards)
    ]
    assert all(s["bytes"] <= SHARD_BYTES for s in manifest["shards"])
    # Other WebDataset readers see one image and one class index per key.
    with tarfile.open(tmp_path / "out" / "shards-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) % 2 == 0 and all(n.endswith((".jpg", ".png", ".cls")) for n in names)


def test_rerun_is_a_no_op_and_packing_is_deterministic(tmp_path, packed, folder):
    out, _ = packed
    before = snapshot(out)
    [result] = pack_folder(folder[0], out, SHARD_BYTES)
    assert result.written == 0 and {p for p, _ in result.skipped} == BAD
    assert snapshot(out) == before  # nothing rewritten, not even the manifest

    pack_folder(folder[0], tmp_path / "again", SHARD_BYTES)
    assert {k: v[0] for k, v in snapshot(tmp_path / "again").items()} == {
        k: v[0] for k, v in before.items()
    }


def test_interrupted_or_damaged_output_is_completed_identically(packed, folder):
    out, _ = packed
    before = {name: data for name, (data, _) in snapshot(out).items()}
    manifest = json.loads(before[MANIFEST])
    last = manifest["shards"].pop()
    manifest["complete"] = False
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / last["file"]).unlink()
    (out / f".{last['file']}.x1y2.tmp").write_bytes(b"half a shard")  # what a crash leaves
    [result] = pack_folder(folder[0], out, SHARD_BYTES)
    assert result.written == 1
    assert {name: data for name, (data, _) in snapshot(out).items()} == before

    middle = out / "shards-000001.tar"
    damaged = bytearray(middle.read_bytes())
    damaged[600] ^= 0xFF
    middle.write_bytes(damaged)
    with pytest.raises(DatasetError, match=r"shards-000001\.tar: its SHA-256 is not"):
        ShardSet(out, verify=True)
    [result] = pack_folder(folder[0], out, SHARD_BYTES)
    assert result.written == result.shards - 1  # from the damaged shard on
    assert {name: data for name, (data, _) in snapshot(out).items()} == before


def test_a_run_stopped_midway_resumes_to_the_same_shards(tmp_path, packed, folder, monkeypatch):
    expected = {name: data for name, (data, _) in snapshot(packed[0]).items()}
    prepare, calls = shards_module._prepare, []

    def stopped_at_the_fifteenth(path: Path, max_size: int | None):
        calls.append(path)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return prepare(path, max_size)

    monkeypatch.setattr(shards_module, "_prepare", stopped_at_the_fifteenth)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        pack_folder(folder[0], out, SHARD_BYTES)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(DatasetError, match="packing was not finished"):
        ShardSet(out)
    monkeypatch.undo()
    [result] = pack_folder(folder[0], out, SHARD_BYTES)
    assert 0 < result.written < result.shards
    assert {name: data for name, (data, _) in snapshot(out).items()} == expected


def test_other_settings_do_not_resume_someone_elses_output(packed, folder):
    out, _ = packed
    with pytest.raises(DatasetError, match="shards of another folder or other settings"):
        pack_folder(folder[0], out, SHARD_BYTES * 2)
    with pytest.raises(DatasetError, match="inside the image folder"):
        pack_folder(folder[0], folder[0] / "shards")


def test_max_size_shrinks_large_images_only(tmp_path, folder):
    root, images = folder
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 x 32, shown turned a quarter: 32 wide, 64 high
    Image.new("RGB", (64, 32), (200, 30, 30)).save(root / "cat" / "turned.jpg", exif=exif)
    [result] = pack_folder(root, tmp_path / "out", SHARD_BYTES, max_size=24)
    samples = {key: data for key, data, _ in read_all(ShardSet(tmp_path / "out"))}
    shrunk = 0
    for key, (original, _) in images.items():
        with Image.open(io.BytesIO(original)) as img:
            size, fmt, mode = img.size, img.format, img.mode
        with Image.open(io.BytesIO(samples[key])) as img:
            if min(size) <= 24:
                assert samples[key] == original
                continue
            shrunk += 1
            assert min(img.size) == 24 and img.format == fmt and img.mode == mode
            assert abs(img.size[0] / img.size[1] - size[0] / size[1]) < 0.1
    with Image.open(io.BytesIO(samples["cat/turned"])) as img:
        assert img.size == (24, 48) and img.format == "JPEG"
    assert result.resized == shrunk + 1 and shrunk > 5


@pytest.mark.parametrize(
    ("world", "workers", "shard_bytes"), [(2, 1, SHARD_BYTES), (2, 2, SHARD_BYTES), (2, 3, 1 << 20)]
)
def test_readers_share_an_epoch_exactly_once(tmp_path, folder, world, workers, shard_bytes):
    root, images = folder
    [result] = pack_folder(root, tmp_path / "out", shard_bytes)
    # One shard among six readers: each reads it and keeps every sixth sample.
    assert (result.shards < world * workers) == (shard_bytes > SHARD_BYTES)
    shards = ShardSet(tmp_path / "out")
    parts = [
        [key for key, _, _ in read_all(shards, rank=r, world=world, worker=w, workers=workers)]
        for r in range(world)
        for w in range(workers)
    ]
    assert sorted(key for part in parts for key in part) == sorted(images)  # once, in one part
    assert all(parts)


def test_order_is_fixed_by_seed_and_epoch(packed):
    shards = ShardSet(packed[0])

    def keys(epoch: int, seed: int = 0) -> list[str]:
        return [key for key, _, _ in read_all(shards, epoch=epoch, seed=seed, buffer=8)]

    assert keys(0) == keys(0)
    assert keys(1) != keys(0) and sorted(keys(1)) == sorted(keys(0))
    assert keys(0, seed=1) != keys(0)
    assert [k for k, _, _ in read_all(shards, buffer=0)] != keys(0)


@pytest.mark.parametrize("buffer", [0, 4])
def test_resume_at_a_shard_boundary_loses_nothing(packed, buffer):
    out, images = packed
    shards = ShardSet(out)
    epoch = shards.samples(3, buffer=buffer)
    seen = []
    for key, _, _ in epoch:
        seen.append(key)
        if len(seen) == 11:
            break
    assert 0 < epoch.shards_done < len(shards.shards)
    resumed = shards.samples(3, buffer=buffer, start_shard=epoch.shards_done)
    rest = [key for key, _, _ in resumed]
    assert set(seen) | set(rest) == set(images) and len(set(rest)) == len(rest)
    again = [key for key in rest if key in seen]  # of shards past `shards_done`, yielded
    assert len(again) < len(seen)
    if buffer == 0:  # exactly those of the shard that was being read, in the same order
        assert again == rest[: len(again)] == seen[len(seen) - len(again) :]
    assert resumed.shards_done == len(shards.shards)


def tar_with(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def one_line_error(shards: ShardSet, match: str) -> str:
    with pytest.raises(DatasetError, match=match) as e:
        read_all(shards)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_hostile_members_are_one_line_errors_naming_the_shard(tmp_path):
    huge = tmp_path / "huge.tar"
    info = tarfile.TarInfo("x/a.jpg")
    info.size = 1 << 40  # declared, never there: refused before anything is read
    huge.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024)
    one_line_error(ShardSet([huge]), r"huge\.tar: member x/a\.jpg: 1,099,511,627,776 bytes")

    words = tar_with(tmp_path / "words.tar", [("x/a.png", png_bytes()), ("x/a.cls", b"cat")])
    one_line_error(ShardSet([words]), r"words\.tar: member x/a\.cls: label 'cat' is not")
    beyond = tar_with(tmp_path / "beyond.tar", [("x/a.png", png_bytes()), ("x/a.cls", b"2")])
    one_line_error(ShardSet([beyond], classes=["a", "b"]), r"beyond\.tar: .*not a class index")
    assert len(read_all(ShardSet([beyond], classes=["a", "b", "c"]))) == 1
    with pytest.raises(DatasetError, match=r"missing\.tar: no such shard file"):
        ShardSet([tmp_path / "missing.tar"])
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 2048)
    one_line_error(ShardSet([tmp_path / "junk.tar"]), r"junk\.tar: not a tar file")


def test_damaged_samples_are_skipped_and_reported(tmp_path, capsys):
    good, png = ("ok/a.png", png_bytes()), png_bytes()
    path = tar_with(
        tmp_path / "damaged.tar",
        [good, ("ok/a.cls", b"0"), ("no/label.png", png), ("no/image.cls", b"1")],
    )
    path.write_bytes(path.read_bytes()[:-1024] + b"garbage" + b"\0" * 1017)  # after the end
    shards = ShardSet([path])
    assert [(k, d, lb) for k, d, lb in read_all(shards)] == [("ok/a", png, 0)]
    reasons = dict(shards.skipped)
    assert reasons[f"{path}:no/label"] == "no .cls label"
    assert reasons[f"{path}:no/image"] == "no image member"
    assert any(r.startswith("damaged after byte") for r in reasons.values())
    assert "damaged.tar: skipped 3 damaged sample(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something else"}', "not a shard set manifest"),
        (
            '{"format": "vitkit-shards", "version": 1, "classes": ["a"], "complete": true, '
            '"shards": [{"file": "../elsewhere.tar", "samples": 1, "bytes": 1, "sha256": "0"}]}',
            r"shard 0: \"file\" must be",
        ),
        (
            '{"format": "vitkit-shards", "version": 1, "classes": ["a"], "complete": false, '
            '"shards": []}',
            "packing was not finished",
        ),
        ('"' + "x" * 100 + '"', "not a shard set manifest"),
    ],
)
def test_malformed_manifests_are_one_line_errors(tmp_path, text, match):
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(DatasetError, match=match) as e:
        ShardSet(tmp_path)
    assert str(e.value).startswith(str(tmp_path / MANIFEST)) and "\n" not in str(e.value)


def test_oversized_manifest_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr("vitkit.data.shards.MAX_MANIFEST_BYTES", 64)
    (tmp_path / MANIFEST).write_text(" " * 65)
    with pytest.raises(DatasetError, match="larger than"):
        ShardSet(tmp_path / MANIFEST)


def test_inspect_lists_what_it_cannot_read_and_never_raises_on_bad_shards(tmp_path, packed):
    out, _ = packed
    report = inspect_source(out)
    assert report.kind == "shard set" and report.counts == [8, 8, 8] and not report.unreadable
    assert report.width == (16, 40, 72) and report.formats == {"JPEG": 12, "PNG": 12}

    bad_label = tar_with(tmp_path / "bad.tar", [("x/a.png", png_bytes()), ("x/a.cls", b"-1")])
    corrupt = tar_with(tmp_path / "corrupt.tar", [("x/b.png", b"\x89PNG junk"), ("x/b.cls", b"0")])
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 2048)
    report = inspect_source(tmp_path / "{bad,corrupt,junk}.tar")
    problems = dict(report.unreadable)
    assert "label '-1' is not a class index" in problems[f"{bad_label}:x/a"]
    assert problems[f"{corrupt}:x/b.png"].startswith("not an image")
    assert problems[str(tmp_path / "junk.tar")].startswith("not a tar file")


def test_cli_data_inspect_pack_and_bad_input(tmp_path, folder, capsys):
    root, _ = folder
    assert main(["data", "inspect", str(root)]) == 1  # it found unreadable files
    out = capsys.readouterr().out
    assert "3 classes, 24 images" in out and "images per class: cat 8, dog 8, fish 8" in out
    for name in BAD:
        assert f"    {name}: " in out

    assert main(["data", "pack", str(root), str(tmp_path / "out"), "--shard-size", "25kB"]) == 0
    out = capsys.readouterr().out
    assert "24 images in 3 classes" in out and "skipped 3 unreadable file(s)" in out
    assert main(["data", "inspect", str(tmp_path / "out" / MANIFEST)]) == 0
    assert "shard set, 3 classes, 24 images" in capsys.readouterr().out

    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere: not an image folder, manifest, shard set" in err
    with pytest.raises(SystemExit):
        main(["data", "pack", str(root), str(tmp_path / "x"), "--shard-size", "lots"])
    assert "not a size: 'lots'" in capsys.readouterr().err


def test_split_folders_pack_into_split_shard_sets(tmp_path):
    make_folder(tmp_path / "data" / "train")
    (tmp_path / "data" / "val" / "dog").mkdir(parents=True)
    Image.new("RGB", (9, 9)).save(tmp_path / "data" / "val" / "dog" / "a.png")
    train, val = pack_folder(tmp_path / "data", tmp_path / "out", SHARD_BYTES)
    assert (train.samples, val.samples) == (24, 1)
    assert [(k, lb) for k, _, lb in read_all(ShardSet(tmp_path / "out" / "val"))] == [("dog/a", 1)]
    report = inspect_source(tmp_path / "out")
    assert list(report.splits) == ["train", "val"] and report.splits["val"].counts == [0, 1, 0]


def test_hostile_file_names_become_safe_keys(tmp_path):
    (tmp_path / "in" / "a b").mkdir(parents=True)
    for name in ("x.y\n[31m.png", "x.y\t[31m.jpg"):
        Image.new("RGB", (9, 9)).save(tmp_path / "in" / "a b" / name, "PNG")
    pack_folder(tmp_path / "in", tmp_path / "out")
    keys = sorted(key for key, _, _ in read_all(ShardSet(tmp_path / "out")))
    assert keys == ["a_b/x_y__31m", "a_b/x_y__31m_2"]


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GB", 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 << 30), ("1.5k", 1500), ("4096", 4096)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_indexed_shards_read_each_sample_by_index_like_the_folder(tmp_path, packed, folder):
    out, images = packed
    source = open_shards(out)
    assert source.classes == CLASSES and len(source) == 24 and source.name == "shards"
    by_key = {source.keys[i].rsplit(".", 1)[0]: i for i in range(len(source))}
    assert set(by_key) == set(images)
    for key, (data, label) in images.items():
        i = by_key[key]
        assert source.read(i).read() == data and source.labels[i] == label
    # The same images as the folder's, decoded alike; a split of the set is a split by labels.
    train = open_source(out, "train", val_fraction=0.25)
    val = open_source(out, "val", val_fraction=0.25)
    assert len(train) + len(val) == 24 and len(val) == 6
    key = source.keys[train.indices[0]].rsplit(".", 1)[0]
    ext = source.keys[train.indices[0]].rsplit(".", 1)[1]
    assert torch.equal(
        load_image(train.read(0), 3, 16), load_image(folder[0] / f"{key}.{ext}", 3, 16)
    )


def test_a_shard_changed_after_indexing_is_an_unreadable_sample(tmp_path, packed):
    out, _ = packed
    source = open_shards(out)
    last = max(range(len(source)), key=lambda i: (source._shard[i], source._offset[i]))
    shard = source.shards[source._shard[last]]
    shard.write_bytes(shard.read_bytes()[: source._offset[last] + 3])
    with pytest.raises(
        UnreadableImage, match=r"shards-\d+\.tar:.*shorter than when it was indexed"
    ):
        source.read(last)
    stream = ImageStream(source, 16, 3, workers=0)
    images, _ = next(stream.batches(0, [last], 1))
    assert images.shape == (1, 3, 16, 16) and len(stream.skipped) == 1


def test_split_shard_sets_keep_their_splits(tmp_path):
    root = tmp_path / "photos"
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / split / cls / f"{i}.png")
    pack_folder(root, tmp_path / "out", SHARD_BYTES)
    assert len(open_source(tmp_path / "out", "train")) == 12
    assert len(open_source(tmp_path / "out", "test")) == 4  # the val set stands in for test
    assert open_source(tmp_path / "out", "val").classes == ["a", "b"]
