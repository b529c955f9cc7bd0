"""Fine-tuning a pretrained ViT: new head, new resolution, probe, layer decay, clear errors."""

import pytest
import torch

from vitkit import create_model, load_model
from vitkit.cli import main
from vitkit.train import TrainConfig, train
from vitkit.train.optim import param_groups
from vitkit.weights.format import load_config, resolve_model_dir

# Fine-tuning resolution: one token a side more than the shipped model's grid, so that its
# position embeddings are resampled (a plain ViT's token stride is its patch size; a hybrid's
# also counts its CNN's stride).
SHIPPED = load_config(resolve_model_dir("fashion-mnist"))  # its config.json alone
STRIDE = SHIPPED.token_stride
SIZE = STRIDE * (SHIPPED.grid_size + 1)


def _digits(**kw) -> TrainConfig:
    settings = {
        "data": "digits",
        "epochs": 3,
        "batch_size": 32,
        "lr": 1e-3,
        "warmup_epochs": 0.3,
        "precision": "fp32",
        "label_smoothing": 0.0,
        "model_overrides": {"image_size": SIZE},
    }
    return TrainConfig.from_dict(settings | kw)


@pytest.mark.slow
def test_finetuning_the_shipped_model_beats_scratch_on_digits(tmp_path):
    tuned = train(_digits(init="fashion-mnist", num_classes=10), tmp_path / "ft", progress=False)
    arch = {k: v for k, v in SHIPPED.to_dict().items() if k not in ("num_classes", "mean", "std")}
    scratch = train(
        _digits(model="Ti/7@28", model_overrides=arch | {"image_size": SIZE}),
        tmp_path / "scratch",
        progress=False,
    )
    assert tuned.step == scratch.step
    assert tuned.val_acc > scratch.val_acc + 0.05, (tuned.val_acc, scratch.val_acc)
    model = load_model(tmp_path / "ft")
    assert model.config.image_size == SIZE
    assert model.pos_embed.shape[1] == 1 + (SIZE // STRIDE) ** 2
    assert model.labels == [str(i) for i in range(10)]


@pytest.mark.slow
def test_linear_probe_trains_the_head_only(tmp_path):
    train(
        _digits(init="fashion-mnist", num_classes=10, linear_probe=True, epochs=1),
        tmp_path / "probe",
        progress=False,
    )
    before, after = load_model("fashion-mnist"), load_model(tmp_path / "probe")
    before.set_image_size(SIZE)  # the same resampling of the position embeddings
    a, b = before.state_dict(), after.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))
    assert not torch.equal(a["head.weight"], b["head.weight"])


def test_head_size_mismatch_needs_num_classes(tmp_path, capsys):
    model = create_model("Ti/7@28", num_classes=4, width=64, heads=2, depth=1)
    from vitkit import save_model

    save_model(model, tmp_path / "four")
    with pytest.raises(ValueError, match="pretrained head has 4 classes and the data 10"):
        train(_digits(init=str(tmp_path / "four")), tmp_path / "r", progress=False)
    args = [
        "finetune",
        str(tmp_path / "four"),
        "--data",
        "digits",
        "--image-size",
        "30",
        "--num-classes",
        "10",
        "--quiet",
        "--out",
        str(tmp_path / "r2"),
    ]
    assert main(args) == 2
    assert "not a multiple of patch_size" in capsys.readouterr().err


def test_layer_decay_scales_lower_layers_less():
    model = create_model("Ti/7@28", depth=2)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == 1.0
    assert scale["blocks.1.attn.qkv.weight"] == 0.5 and scale["blocks.0.mlp.fc1.bias"] == 0.25
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.125


@pytest.mark.slow
def test_recipe_regularisation_applies_to_a_pretrained_model(tmp_path):
    cfg = _digits(
        init="fashion-mnist",
        num_classes=10,
        max_steps=2,
        model_overrides={"image_size": SIZE, "drop_path": 0.2, "dropout": 0.1},
    )
    train(cfg, tmp_path / "reg", progress=False)
    tuned = load_model(tmp_path / "reg")
    assert (tuned.config.drop_path, tuned.config.dropout) == (0.2, 0.1)
    assert tuned.config.width == SHIPPED.width
    cfg = _digits(init="fashion-mnist", num_classes=10, model_overrides={"width": 64})
    with pytest.raises(ValueError, match="width cannot change when fine-tuning"):
        train(cfg, tmp_path / "bad", progress=False)
