import itertools
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.fashion import load_fashion_mnist
from tests.paths import RECIPES
from vitkit import load_model
from vitkit.cli import main
from vitkit.data import ImageDataset, load_dataset
from vitkit.train import TrainConfig, load_recipe, train
from vitkit.train.optim import lr_factor, param_groups
from vitkit.train.setup import model_config
from vitkit.weights import CheckpointError

# A small, fast encoder for 8x8 digits: 16 patches of 2x2.
TINY = {"image_size": 8, "patch_size": 2, "width": 64, "depth": 2, "heads": 2}


def tiny_config(**kw) -> TrainConfig:
    settings = {
        "data": "digits",
        "model": "Ti/4@28",
        "model_overrides": TINY,
        "epochs": 2,
        "batch_size": 64,
        "lr": 2e-3,
        "warmup_epochs": 0.5,
        "precision": "fp32",
        "augment": {"crop_padding": 1},
    }
    return TrainConfig.from_dict(settings | kw)


def test_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, min_factor=0.01) == pytest.approx(0.01)
    values = [lr_factor(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_no_decay_on_norms_biases_embeddings_tokens():
    from vitkit import create_model

    model = create_model("Ti/4@28", depth=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.norm1.bias"} <= spared
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"} <= decayed
    # SigLIP's attention pool: its probe is a token, its projections are weights.
    pooled = create_model("Ti/4@28", depth=1, pool="map", class_token=False)
    decay, no_decay = param_groups(pooled, 0.05)
    names = {id(p): n for n, p in pooled.named_parameters()}
    assert "attn_pool.latent" in {names[id(p)] for p in no_decay["params"]}
    assert "attn_pool.kv.weight" in {names[id(p)] for p in decay["params"]}


@pytest.mark.slow
def test_digits_learns_and_run_dir_is_a_model(tmp_path):
    cfg = tiny_config(epochs=30, lr=3e-3, warmup_epochs=1.0, label_smoothing=0.0, augment={})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.val_acc > 0.8  # chance is 0.1
    model = load_model(tmp_path / "run")
    assert model.labels == [str(i) for i in range(10)]
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [float(e) for e in range(1, 31)]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    for name in ("loss.png", "accuracy.png", "train.json", "best/model.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path):
    cfg = tiny_config(ema_decay=0.9, augment={"crop_padding": 1, "mixup": 0.2})
    full = train(cfg, tmp_path / "full", progress=False)
    stopped = train(
        tiny_config(**{**cfg.to_dict(), "max_steps": 13}), tmp_path / "part", progress=False
    )
    assert stopped.step == 13 and stopped.step < full.step
    resumed = train(TrainConfig(), tmp_path / "part", resume=True, progress=False)
    assert resumed.step == full.step
    a = load_model(tmp_path / "full").state_dict()
    b = load_model(tmp_path / "part").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val_acc == full.val_acc


@pytest.mark.slow
def test_ctrl_c_saves_the_run_and_resume_finishes_it(tmp_path):
    """SIGINT mid-run: the step in progress ends, the state is saved, exit code 130."""
    run = tmp_path / "run"
    flags = [f"--set={k}={v}" for k, v in TINY.items()]
    argv = ["train", "--data", "digits", "--model", "Ti/4@28", "--epochs", "500", "--quiet"]
    argv += ["--batch-size", "64", "--precision", "fp32", "--out", str(run), *flags]
    proc = subprocess.Popen([sys.executable, "-m", "vitkit", *argv], stdout=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.json").is_file():  # the first epoch is saved
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130
    step, total = map(int, re.search(r"step (\d+)/(\d+)", out).groups())
    assert 22 <= step < total == 500 * 22
    resumed = train(TrainConfig(max_steps=step + 30), run, resume=True, progress=False)
    assert resumed.step == step + 30 and not resumed.interrupted
    assert json.loads((run / "train.json").read_text())["max_steps"] == step + 30


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(TrainConfig(), tmp_path, resume=True, progress=False)


@pytest.mark.slow
def test_fashion_mnist_short_run_learns(tmp_path):
    """A few thousand real Fashion-MNIST images, two epochs: far above chance on held-out data."""
    full, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    gen = torch.Generator().manual_seed(0)
    sub = full.subset(torch.randperm(len(full), generator=gen)[:6000])
    held = test.subset(torch.arange(2000))
    cfg = TrainConfig.from_dict(
        {
            "model": "Ti/7@28",
            "model_overrides": {"width": 64, "depth": 4, "heads": 4},
            "epochs": 2,
            "batch_size": 32,
            "lr": 2e-3,
            "warmup_epochs": 0.1,
            "label_smoothing": 0.0,
            "precision": "fp32",
        }
    )
    result = train(cfg, tmp_path / "fm", progress=False, datasets=(sub, held))
    assert result.val_acc > 0.6  # chance is 0.1


def test_recipes_parse_and_state_their_result():
    recipes = sorted(RECIPES.glob("*.toml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.command.startswith("vitkit train") and recipe.result, path
        assert recipe.config.epochs >= 1


def test_bad_recipe_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\ndata = "digits"\nepocs = 3\n')
    with pytest.raises(ValueError, match="unknown training setting.*epocs"):
        load_recipe(bad)
    bad.write_text("[augment]\nmixupp = 0.2\n")
    with pytest.raises(ValueError, match="mixupp"):
        load_recipe(bad)


def test_cli_train_then_predict(tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--quiet",
        "--set",
        "image_size=8",
        "--set",
        "patch_size=2",
        "--set",
        "width=64",
        "--set",
        "depth=1",
        "--set",
        "heads=2",
        "--out",
        str(run),
    ]
    assert main([*args, "--max-steps", "10"]) == 0  # stopped early, then resumed
    assert "step 10/22" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "step 22/22, held-out accuracy" in capsys.readouterr().out
    digits = load_dataset("digits", "test")
    from PIL import Image

    for i in range(3):
        Image.fromarray(digits.images[i, 0].numpy()).save(tmp_path / f"{i}.png")
    assert main(["predict", str(run), str(tmp_path / "0.png"), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    probs = [p["probability"] for p in row["predictions"]]
    assert len(probs) == 5 and row["error"] is None
    assert probs == sorted(probs, reverse=True) and 0.0 < sum(probs) <= 1.0 + 1e-6


@pytest.mark.parametrize(("size", "patch"), [(28, 4), (32, 4), (8, 1), (64, 8)])
def test_default_model_fits_the_data(size, patch):
    """Without --model: the small preset, its patches cutting any other size into 8x8."""
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    data = ImageDataset(images, torch.tensor([0, 1, 2, 1]), ["a", "b", "c"])
    c = model_config(TrainConfig(), data)
    assert (c.image_size, c.patch_size, c.in_channels, c.num_classes) == (size, patch, 3, 3)
    assert c.width == 192 and c.depth == 6


def test_dataset_smaller_than_batch(tmp_path):
    ds = ImageDataset(
        torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.zeros(10, dtype=torch.long), ["a", "b"]
    )
    with pytest.raises(ValueError, match="exceeds the 10 training images"):
        train(tiny_config(), tmp_path / "r", progress=False, datasets=(ds, ds))


@pytest.mark.slow
def test_cli_trains_and_evaluates_an_image_folder(tmp_path, capsys):
    """An image folder split by fraction: eval's default split is the part training held out."""
    from PIL import Image

    digits = load_dataset("digits", "test")
    folder = tmp_path / "digits"
    for i in range(240):
        label = digits.classes[int(digits.labels[i])]
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i, 0].numpy()).save(folder / label / f"{i}.png")
    run = tmp_path / "run"
    flags = ["--set", "in_channels=1", *(f"--set={k}={v}" for k, v in TINY.items())]
    argv = ["train", "--data", str(folder), "--val-fraction", "0.25", "--epochs", "1"]
    argv += ["--batch-size", "32", "--precision", "fp32", "--quiet", "--out", str(run), *flags]
    assert main(argv) == 0
    trained = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    held_out = sum(round(n * 0.25) for n in torch.bincount(digits.labels[:240]).tolist())
    assert report["num_images"] == held_out
    assert report["top1"] == pytest.approx(trained["val_acc"])
