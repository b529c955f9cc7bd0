import argparse
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitkit import create_model, save_model
from vitkit.cli.eval import add_eval_command
from vitkit.cli.predict import add_predict_command
from vitkit.data import ImageDataset
from vitkit.data.preprocess import load_image, preprocess
from vitkit.evaluate import save_report
from vitkit.infer import Classifier, evaluate
from vitkit.infer.predict import expand_inputs
from vitkit.plots import plot_confusion, plot_curves

LABELS = [f"c{i}" for i in range(10)]


def small_model(seed: int = 0):
    # Two narrow blocks: every code path of a real model at a fraction of the cost.
    return create_model("Ti/4@28", seed=seed, width=32, heads=2, depth=2).eval()


def biased(model, winner: int = 3):
    """A head that ignores the image: class `winner` always gets ~99.95% probability."""
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[winner] = 10.0
    return model


@pytest.fixture
def model_dir(tmp_path):
    model = small_model()
    torch.nn.init.normal_(model.head.weight)  # the initial zero head predicts uniformly
    return save_model(model, tmp_path / "model", labels=LABELS)


@pytest.fixture
def biased_dir(tmp_path):
    return save_model(biased(small_model()), tmp_path / "biased", labels=LABELS)


def _noise(rng, h, w, channels):
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def image_dir(tmp_path):
    """Files of several formats, sizes and modes, plus things a folder scan must skip."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    Image.fromarray(_noise(rng, 28, 28, 1), "L").save(root / "grey.png")
    Image.fromarray(_noise(rng, 40, 64, 3), "RGB").save(root / "wide.JPG", quality=90)
    Image.fromarray(_noise(rng, 50, 30, 3), "RGB").convert("P").save(root / "sub" / "pal.png")
    Image.fromarray(_noise(rng, 33, 33, 4), "RGBA").save(root / "sub" / "alpha.png")
    Image.fromarray(_noise(rng, 9, 9, 1), "L").save(root / ".hidden.png")
    Image.fromarray(_noise(rng, 9, 9, 1), "L").save(root / ".cache" / "thumb.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _corrupt(image_dir):
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return image_dir / "broken.png"


def test_expand_inputs(image_dir):
    # Only the allowed formats' extensions: Pillow reads TGA, but it is not among them.
    Image.new("L", (5, 5)).save(image_dir / "sub" / "scan.tga")
    Image.new("L", (5, 5)).save(image_dir / "sub" / "scan.tif")
    found = expand_inputs([image_dir])
    assert [p.relative_to(image_dir).as_posix() for p in found] == [
        "grey.png",
        "sub/alpha.png",
        "sub/pal.png",
        "sub/scan.tif",
        "wide.JPG",
    ]
    (image_dir / "sub" / "scan.tif").unlink()
    (image_dir / "sub" / "scan.tga").unlink()
    # Files named explicitly are kept as given, before and after a directory.
    assert expand_inputs([image_dir / "notes.txt", image_dir / "sub"]) == [
        image_dir / "notes.txt",
        image_dir / "sub" / "alpha.png",
        image_dir / "sub" / "pal.png",
    ]


def test_predict_files_of_any_size_and_mode(model_dir, image_dir):
    files = expand_inputs([image_dir])
    predictions = Classifier(model_dir).predict(files, top_k=3)
    assert [p.source for p in predictions] == [str(f) for f in files]
    for p in predictions:
        assert p.error is None
        assert len(p.labels) == 3 and all(label in LABELS for label, _ in p.labels)
        probs = [prob for _, prob in p.labels]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # The random head gives different images different answers: images really reach the model.
    assert len({tuple(p.labels) for p in predictions}) == len(files)


def test_batched_equals_one_by_one(model_dir, image_dir):
    files = expand_inputs([image_dir])
    batched = Classifier(model_dir, batch_size=3).predict(files, top_k=10)
    single = Classifier(model_dir, batch_size=1)
    for file, p in zip(files, batched, strict=True):
        (alone,) = single.predict(file, top_k=10)
        assert [lb for lb, _ in alone.labels] == [lb for lb, _ in p.labels]
        assert np.allclose([pr for _, pr in alone.labels], [pr for _, pr in p.labels], atol=1e-5)


def test_corrupt_and_missing_files_do_not_stop_the_others(model_dir, image_dir):
    broken = _corrupt(image_dir)
    files = [image_dir / "grey.png", broken, image_dir / "missing.png", image_dir / "wide.JPG"]
    predictions = Classifier(model_dir, batch_size=2).predict(files)
    assert [p.error is None for p in predictions] == [True, False, False, True]
    assert "broken.png" in predictions[1].error and "missing.png" in predictions[2].error
    assert predictions[1].labels == [] and len(predictions[3].labels) == 5


def test_biased_model_predicts_its_class_for_every_kind_of_input(biased_dir, image_dir):
    classifier = Classifier(biased_dir)
    grey = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    with Image.open(image_dir / "grey.png") as pil:
        inputs = [image_dir / "wide.JPG", pil, grey, grey.float() / 255, torch.rand(3, 40, 20)]
        predictions = classifier.predict(inputs, top_k=2)
    for p in predictions:
        assert p.error is None and p.labels[0][0] == "c3" and p.labels[0][1] > 0.9
    assert predictions[1].source.endswith("grey.png") and predictions[2].source == "<tensor 2>"


def test_uint8_and_float_tensors_agree(model_dir):
    classifier = Classifier(model_dir)
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    a = classifier.predict(images, top_k=10)
    b = classifier.predict(images.float() / 255, top_k=10)
    assert len(a) == 4
    for pa, pb in zip(a, b, strict=True):
        assert [lb for lb, _ in pa.labels] == [lb for lb, _ in pb.labels]


def test_preprocess_channels_crop_and_normalisation():
    grey = create_model("Ti/4@28").config  # mean = std = 0.5
    colour = create_model("Ti/4@32", mean=(0.4, 0.5, 0.6), std=(0.1, 0.2, 0.3)).config
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 28, 28)
    x = preprocess(rgb, grey)
    assert x.shape == (2, 1, 28, 28)
    assert torch.allclose(x, torch.full_like(x, (0.299 - 0.5) / 0.5), atol=1e-6)
    # A grey, non-square image: repeated to three channels, centre-cropped, then resized.
    img = torch.zeros(1, 1, 32, 48, dtype=torch.uint8)
    img[..., :, 8:40] = 255  # the centre square is white, the sides black
    x = preprocess(img, colour)
    assert x.shape == (1, 3, 32, 32)
    expected = (1 - torch.tensor([0.4, 0.5, 0.6])) / torch.tensor([0.1, 0.2, 0.3])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), expected, atol=1e-5)


def test_preprocess_resizes_with_the_models_interpolation(tmp_path):
    img = torch.zeros(1, 1, 56, 56, dtype=torch.uint8)
    img[..., ::2, :] = 255  # stripes: bilinear and bicubic resample them differently
    config = create_model("Ti/4@28").config
    out = {}
    for mode in ("bilinear", "bicubic"):
        c = config.replace(interpolation=mode)
        x = img.float() / 255
        expected = F.interpolate(x, size=(28, 28), mode=mode, antialias=True)
        torch.testing.assert_close(preprocess(img, c), (expected.clamp(0, 1) - 0.5) / 0.5)
        out[mode] = preprocess(img, c)
        # Files are resized by Pillow with the same filter.
        Image.fromarray(img[0, 0].numpy()).save(tmp_path / "stripes.png")
        pil = Image.fromarray(img[0, 0].numpy()).resize((28, 28), getattr(Image, mode.upper()))
        assert torch.equal(
            load_image(tmp_path / "stripes.png", 1, 28, mode)[0], torch.from_numpy(np.array(pil))
        )
    assert not torch.allclose(out["bilinear"], out["bicubic"])
    with pytest.raises(ValueError, match="interpolation"):
        config.replace(interpolation="nearest")


def _dataset(labels, channels=1, size=28):
    n = len(labels)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), list(LABELS), "toy")


def test_evaluate_biased_model():
    model = biased(small_model())
    right = evaluate(model, _dataset([3] * 13), batch_size=5, progress=False)
    assert right.top1 == 1.0 and right.top5 == 1.0 and right.num_images == 13
    assert right.per_class["c3"] == 1.0 and right.per_class["c4"] is None
    assert right.confusion[3][3] == 13 and sum(map(sum, right.confusion)) == 13
    assert right.loss < 0.01 and right.images_per_second > 0

    wrong = evaluate(model, _dataset([4] * 13, channels=3, size=32), progress=False)
    assert wrong.top1 == 0.0 and wrong.top5 >= wrong.top1 and wrong.per_class["c4"] == 0.0
    assert wrong.confusion[4][3] == 13 and sum(map(sum, wrong.confusion)) == 13
    assert wrong.loss > 9


def test_evaluate_matches_a_direct_computation():
    model = small_model(seed=1)
    torch.nn.init.normal_(model.head.weight)
    model.train()
    labels = torch.randint(0, 10, (23,)).tolist()
    data = _dataset(labels)
    report = evaluate(model, data, batch_size=6, progress=False)
    assert model.training  # left in the mode it came in
    model.eval()
    with torch.no_grad():
        logits = model(preprocess(data.images, model.config))
    predicted = logits.argmax(dim=1)
    assert report.top1 == pytest.approx((predicted == data.labels).float().mean().item())
    top5 = (logits.topk(5).indices == data.labels[:, None]).any(dim=1).float().mean().item()
    assert report.top5 == pytest.approx(top5) and report.top5 >= report.top1
    assert report.loss == pytest.approx(F.cross_entropy(logits, data.labels).item(), rel=1e-4)
    expected = torch.zeros(10, 10, dtype=torch.long)
    for t, p in zip(data.labels.tolist(), predicted.tolist(), strict=True):
        expected[t, p] += 1
    assert report.confusion == expected.tolist()


def test_evaluate_matches_classes_by_name():
    model = biased(small_model())
    model.labels = list(LABELS)
    reordered = list(reversed(LABELS))
    data = _dataset([reordered.index("c3")] * 4)
    data.classes = reordered
    report = evaluate(model, data, progress=False)
    assert report.top1 == 1.0 and report.per_class["c3"] == 1.0


def test_evaluate_rejects_mismatched_datasets():
    model = small_model()
    with pytest.raises(ValueError, match="classes"):
        evaluate(
            model,
            ImageDataset(
                torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
                torch.zeros(2, dtype=torch.int64),
                ["a", "b"],
            ),
        )
    with pytest.raises(ValueError, match="labels outside"):
        evaluate(model, _dataset([0, 10]), progress=False)


def test_save_report(tmp_path):
    report = evaluate(biased(small_model()), _dataset([3, 3, 4]), progress=False)
    out = save_report(report, tmp_path / "eval", LABELS)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["top1"] == pytest.approx(2 / 3) and saved["confusion"] == report.confusion
    assert saved["per_class"]["c0"] is None
    with Image.open(out / "confusion.png") as png:
        assert png.format == "PNG" and min(png.size) > 500


@pytest.mark.slow
def test_confusion_plot_for_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 5, (100, 100)) + np.eye(100, dtype=np.int64) * 50
    path = plot_confusion(matrix, [f"class {i}" for i in range(100)], tmp_path / "c.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and min(png.size) > 2000
    with pytest.raises(ValueError, match="10x10"):
        plot_confusion(matrix, LABELS, tmp_path / "bad.png")


def _run(add_command, argv):
    parser = argparse.ArgumentParser(prog="vitkit")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_predict_command(biased_dir, image_dir, capsys):
    assert _run(add_predict_command, ["predict", str(biased_dir), str(image_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    first = re.escape(str(image_dir / "grey.png"))
    assert re.fullmatch(rf"{first}: c3 \(100\.0%\)(, c\d \(0\.0%\)){{4}}", lines[0])

    argv = ["predict", str(biased_dir), str(image_dir / "sub"), "--json", "--top-k", "2"]
    assert _run(add_predict_command, argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [
        str(image_dir / "sub" / n) for n in ("alpha.png", "pal.png")
    ]
    assert all(r["error"] is None and len(r["predictions"]) == 2 for r in rows)
    assert rows[0]["predictions"][0]["label"] == "c3"


def test_predict_command_reports_bad_files(biased_dir, image_dir, tmp_path, capsys):
    broken = _corrupt(image_dir)
    assert _run(add_predict_command, ["predict", str(biased_dir), str(image_dir)]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 4 and "broken.png" in captured.err

    assert _run(add_predict_command, ["predict", str(biased_dir), str(broken), "--json"]) == 1
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["predictions"] == [] and "broken.png" in row["error"]

    (tmp_path / "empty").mkdir()
    assert _run(add_predict_command, ["predict", str(biased_dir), str(tmp_path / "empty")]) == 2


def test_eval_command(biased_dir, monkeypatch, capsys):
    requested = {}

    def fake_load_dataset(spec, split, data_dir, image_size, channels, val_fraction, crop_pct):
        requested.update(spec=spec, split=split, size=image_size, channels=channels)
        requested["val_fraction"] = val_fraction
        return _dataset([3, 3, 3, 5])

    monkeypatch.setattr("vitkit.data.load_dataset", fake_load_dataset, raising=False)
    assert _run(add_eval_command, ["eval", str(biased_dir), "--data", "toy"]) == 0
    assert requested == {
        "spec": "toy",
        "split": "test",
        "size": 28,
        "channels": 1,
        "val_fraction": 0.1,
    }
    out = capsys.readouterr().out
    assert "top-1 75.00%" in out and "c5" in out
    assert (biased_dir / "eval" / "eval.json").is_file()
    assert (biased_dir / "eval" / "confusion.png").is_file()

    argv = ["eval", str(biased_dir), "--data", "toy", "--json", "--out", str(biased_dir / "x")]
    assert _run(add_eval_command, argv) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == 0.75
    assert (biased_dir / "x" / "eval.json").is_file()

    # A run's held-out fraction is the default, so evaluation sees the images training held out.
    (biased_dir / "train.json").write_text(json.dumps({"val_fraction": 0.25}))
    assert _run(add_eval_command, ["eval", str(biased_dir), "--data", "toy", "--json"]) == 0
    assert requested["val_fraction"] == 0.25
    argv = ["eval", str(biased_dir), "--data", "toy", "--json", "--val-fraction", "0.3"]
    assert _run(add_eval_command, argv) == 0 and requested["val_fraction"] == 0.3


def test_plot_curves(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = []
    for step in range(1, 31):
        epoch = step / 10
        lines.append({"epoch": epoch, "step": step, "train_loss": 2.3 / epoch, "lr": 1e-3})
        if step % 10 == 0:
            lines.append({"epoch": epoch, "step": step, "val_loss": 2 / epoch, "val_acc": 0.3})
    log.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    written = plot_curves(log, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "accuracy.png"]
    for p in written:
        with Image.open(p) as png:
            assert png.format == "PNG"
    log.write_text('{"epoch": 1, "train_loss": 1.0}\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        plot_curves(log, tmp_path / "plots")
