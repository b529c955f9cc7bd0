"""Streamed image folders: the same batches for any number of decoding workers, random crops
at full resolution, unreadable files passed over and reported, exact resume, disjoint slices
for several processes, and the memory budget that picks in-memory or streamed."""

from __future__ import annotations

import io
import json
import random
import types

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit import create_model, load_model, save_model
from vitkit.cli import main
from vitkit.data import ImageStream, RandomResizedCrop, load_image, stream_source
from vitkit.data import stream as stream_module
from vitkit.data.preprocess import centre_square
from vitkit.data.sample_augment import OPS, SampleAugment
from vitkit.data.transforms import RANDAUGMENT_OPS
from vitkit.train import TrainConfig, train
from vitkit.train import loop as loop_module
from vitkit.train.distributed import World
from vitkit.train.setup import load_splits

CLASSES = ("circle", "square", "stripes")


def photo(kind: str, seed: int, size: tuple[int, int]) -> Image.Image:
    """A noisy picture of its class, large enough that crops see different parts of it."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    if kind == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.25 * min(w, h)) ** 2
    elif kind == "square":
        mask = (abs(xx - cx) < 0.2 * min(w, h)) & (abs(yy - cy) < 0.2 * min(w, h))
    else:
        mask = (xx // max(1, w // 12)) % 2 == 0
    base = rng.integers(0, 80, (h, w, 3))
    pixels = np.where(mask[..., None], 255 - base, base).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 16 JPEG photos of 120-200 px sides."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c, kind in enumerate(CLASSES):
        (root / kind).mkdir()
        for i in range(16):
            size = (int(rng.integers(120, 200)), int(rng.integers(120, 200)))
            photo(kind, 100 * c + i, size).save(root / kind / f"{i:02d}.jpg", quality=90)
    return root


def epoch_batches(stream: ImageStream, epoch: int = 0, size: int = 8, start: int = 0):
    order = torch.randperm(len(stream), generator=torch.Generator().manual_seed(epoch)).tolist()
    return list(stream.batches(epoch, order, size, start))


def test_batches_are_the_same_for_any_number_of_workers(folder):
    crop = RandomResizedCrop((0.2, 1.0))
    augment = SampleAugment(hflip=True, randaugment_ops=2, randaugment_magnitude=9)
    runs = [
        epoch_batches(stream_source(folder, "train", 32, 3, crop=crop, workers=w, augment=augment))
        for w in (0, 1, 2)
    ]
    assert len(runs[0]) == len(stream_source(folder, "train", 32, 3)) // 8 > 1
    for other in runs[1:]:
        for (a, la), (b, lb) in zip(runs[0], other, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
    # Another epoch crops (and orders) differently; a resumed epoch reads the same batches.
    stream = stream_source(folder, "train", 32, 3, crop=crop, workers=0, augment=augment)
    assert not torch.equal(epoch_batches(stream, 1)[0][0], runs[0][0][0])
    later = epoch_batches(stream, 0, start=2)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(later, runs[0][2:], strict=True))


def test_a_random_crop_is_decoded_from_the_full_resolution_file(tmp_path):
    """The crop box is cut from the photo itself, not from a centre square at the final size:
    it equals cropping the decoded photo and resizing that box."""
    img = photo("circle", 0, (640, 480))
    img.save(tmp_path / "p.png")
    box = (0.1, 0.05, 0.45, 0.6)  # off-centre, not square
    got = load_image(tmp_path / "p.png", 3, 32, crop=lambda w, h: box)
    w, h = img.size
    ref = img.resize((32, 32), Image.Resampling.BICUBIC, box=(0.1 * w, 0.05 * h, 0.45 * w, 0.6 * h))
    diff = np.abs(got.permute(1, 2, 0).numpy().astype(int) - np.asarray(ref).astype(int))
    assert diff.mean() < 2.0  # the reduction before resizing rounds a little
    centre = load_image(tmp_path / "p.png", 3, 32)
    assert torch.equal(centre, load_image(tmp_path / "p.png", 3, 32, crop=centre_square))
    assert not torch.equal(got, centre)


def test_random_resized_crop_draws_like_timm():
    crop = RandomResizedCrop((0.08, 1.0), (3 / 4, 4 / 3))
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(2000):
        x0, y0, x1, y1 = crop.box(rng)(400, 300)
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        areas.append((x1 - x0) * (y1 - y0))
        ratios.append((x1 - x0) * 400 / ((y1 - y0) * 300))
    assert min(areas) >= 0.08 - 1e-6 and max(areas) <= 1
    assert 0.3 < float(np.mean(areas)) < 0.7
    assert min(ratios) >= 3 / 4 - 1e-6 and max(ratios) <= 4 / 3 + 1e-6


def test_unreadable_files_are_passed_over_and_named(folder, tmp_path):
    bad = tmp_path / "bad"
    for kind in CLASSES:
        (bad / kind).mkdir(parents=True)
        for f in (folder / kind).iterdir():
            (bad / kind / f.name).write_bytes(f.read_bytes())
    (bad / "circle" / "zero.jpg").write_bytes(b"")
    (bad / "square" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    data = (folder / "stripes" / "00.jpg").read_bytes()
    (bad / "stripes" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    stream = stream_source(bad, "train", 32, 3, val_fraction=0.01, workers=2)
    batches = epoch_batches(stream, size=len(stream))  # the whole split, once
    images, _ = batches[0]
    assert len(images) == len(stream)
    skipped = "\n".join(stream.skipped)
    assert "zero.jpg" in skipped and "corrupt.png" in skipped
    assert "truncated.jpg" in skipped


def test_processes_read_disjoint_slices_of_every_epoch(folder):
    """Two processes under torchrun: each reads its half of each batch, never the other's."""
    stream = stream_source(folder, "train", 16, 3, workers=0)
    seen = []
    for rank in (0, 1):
        run = types.SimpleNamespace(
            cfg=TrainConfig(batch_size=8),
            steps_per_epoch=len(stream) // 8,
            step=0,
            stream=stream,
            images=None,
            labels=stream.labels,
            world=World(rank, 2, torch.device("cpu")),
        )
        perm = torch.randperm(len(stream), generator=torch.Generator().manual_seed(3))
        read = []
        for images, _ in loop_module._batches(run, 0, perm):
            assert len(images) == 4
            read += [bytes(image.numpy()) for image in images]
        seen.append(read)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == len(stream) // 8 * 8


def test_the_memory_budget_decides_and_says_why(folder, monkeypatch, capsys):
    cfg = TrainConfig(data=str(folder), batch_size=8)
    train_ds, _ = load_splits(cfg, 32, 3)
    assert not isinstance(train_ds, ImageStream)
    assert "decoded into memory" in capsys.readouterr().out
    monkeypatch.setattr(stream_module, "memory_budget", lambda: 1000)
    train_ds, val_ds = load_splits(cfg, 32, 3)
    assert isinstance(train_ds, ImageStream) and isinstance(val_ds, ImageStream)
    out = capsys.readouterr().out
    assert "streamed from its files" in out and "budget" in out


def stream_config(folder, **kw) -> TrainConfig:
    settings = {
        "data": str(folder),
        "model": "Ti/4@28",
        "model_overrides": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        "stream": True,
        "workers": 1,
        "epochs": 2,
        "batch_size": 8,
        "val_fraction": 0.25,
        "precision": "fp32",
        "augment": {"random_resized_crop": True, "hflip": True, "crop_scale": [0.3, 1.0]},
    }
    return TrainConfig.from_dict(settings | kw)


@pytest.mark.slow
def test_a_streamed_run_resumes_to_the_same_weights(folder, tmp_path):
    full = train(stream_config(folder), tmp_path / "full", progress=False)
    stopped = train(stream_config(folder, max_steps=5), tmp_path / "part", progress=False)
    assert stopped.step == 5 < full.step
    resumed = train(TrainConfig(), tmp_path / "part", resume=True, progress=False)
    assert resumed.step == full.step
    a = load_model(tmp_path / "full").state_dict()
    b = load_model(tmp_path / "part").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["data_wait"] <= 1 for m in metrics)
    assert load_model(tmp_path / "full").calibration.shape[1:] == (3, 32, 32)


def test_stream_and_in_memory_are_chosen_by_flag_and_hold_out_the_same_images(folder, capsys):
    streamed, streamed_val = load_splits(stream_config(folder, seed=5), 32, 3)
    assert isinstance(streamed, ImageStream) and "as asked" in capsys.readouterr().out
    kept, kept_val = load_splits(stream_config(folder, seed=5, stream=False), 32, 3)
    assert kept.images.shape[1:] == (3, 32, 32)
    # The run's seed changes the crops, not which images are held out.
    assert torch.equal(streamed_val.labels, kept_val.labels)
    images = next(streamed_val.batches(0, range(len(streamed_val)), len(streamed_val)))[0]
    assert torch.equal(images, kept_val.images)


def test_a_jpeg_in_memory_is_read_like_a_file(folder):
    data = (folder / "circle" / "00.jpg").read_bytes()
    from_file = load_image(folder / "circle" / "00.jpg", 3, 32)
    assert torch.equal(load_image(io.BytesIO(data), 3, 32), from_file)


def test_eval_streams_a_large_folder_with_the_same_scores(folder, tmp_path, monkeypatch, capsys):
    model = create_model(
        "Ti/4@28", image_size=32, patch_size=8, width=32, depth=1, heads=2, num_classes=3, seed=0
    )
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(0))
    model.labels = list(CLASSES)
    save_model(model, tmp_path / "m")
    argv = ["eval", str(tmp_path / "m"), "--data", str(folder), "--split", "val", "--json"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    in_memory = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(stream_module, "memory_budget", lambda: 1000)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert "streamed from its files" in captured.err
    streamed = json.loads(captured.out)
    assert streamed["num_images"] == in_memory["num_images"] > 0
    assert streamed["confusion"] == in_memory["confusion"]


def test_a_crop_is_drawn_once_though_asked_for_twice(tmp_path):
    """load_image asks for the box to pick the JPEG's reduced scale and again to resize: both
    must be the same draw, or the scale would be chosen for another box."""
    photo("square", 1, (900, 700)).save(tmp_path / "p.jpg", quality=90)
    crop = RandomResizedCrop((0.6, 1.0))
    used, drawn = random.Random(5), random.Random(5)
    load_image(tmp_path / "p.jpg", 3, 64, crop=crop.box(used))
    crop.box(drawn)(900, 700)
    assert used.getstate() == drawn.getstate()


@pytest.mark.parametrize("k", range(len(OPS)))
def test_per_image_ops_match_the_batched_ones(k):
    """Each RandAugment op on an 8-bit image in a worker does what the batched float op does,
    up to rounding and the interpolation at the borders."""
    img = photo(CLASSES[k % 3], k, (48, 48))
    pixels = np.clip(np.asarray(img, dtype=np.int16) * 0.6 + 40, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)  # levels 40..193: autocontrast and solarize have work to do
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    for v in (0.9, -0.6):
        got = torch.from_numpy(np.array(OPS[k](img, v))).permute(2, 0, 1)[None].float() / 255
        want = RANDAUGMENT_OPS[k](x.clone(), torch.tensor([v]))
        differ = (got - want).abs().mean().item()
        assert differ < 0.01, (OPS[k].__name__, v)  # measured: at most 0.006 (rotation)
        if k:  # not the identity: the op changes the image far more than the two differ
            assert (got - x).abs().mean() > max(0.005, 4 * differ), (OPS[k].__name__, v)
