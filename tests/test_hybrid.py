"""The hybrid (ResNet-v2 + ViT) goes through training, fine-tuning and saving unchanged."""

import pytest
import torch

from vitkit import create_model, load_model, save_model
from vitkit.train import TrainConfig, train

# Digits upsampled to 16 px; the "small" stem (stride 1) and two stages (stride 2) make an
# 8x8 map of 128 channels, cut into 2x2 patches: 4x4 tokens.
HYBRID = {
    "image_size": 16,
    "patch_size": 2,
    "width": 64,
    "depth": 1,
    "heads": 2,
    "resnet_layers": [1, 1],
    "resnet_width": 32,
    "resnet_stem": "small",
}


def _digits(**kw) -> TrainConfig:
    settings = {
        "data": "digits",
        "model": "Ti/4@28",
        "model_overrides": HYBRID,
        "epochs": 8,
        "batch_size": 64,
        "lr": 1e-3,
        "warmup_epochs": 0.5,
        "label_smoothing": 0.0,
        "precision": "fp32",
    }
    return TrainConfig.from_dict(settings | kw)


@pytest.mark.slow
def test_hybrid_learns_digits_then_fine_tunes_at_another_size(tmp_path):
    result = train(_digits(), tmp_path / "run", progress=False)
    assert result.val_acc > 0.8, result.val_acc  # chance is 0.1
    model = load_model(tmp_path / "run")
    c = model.config
    assert (c.resnet_layers, c.token_stride, c.grid_size) == ((1, 1), 4, 4)
    # Fine-tuned at 24 px: a 6x6 grid, position embeddings resampled, the CNN unchanged.
    tuned = train(
        _digits(init=str(tmp_path / "run"), epochs=2, model_overrides={"image_size": 24}),
        tmp_path / "ft",
        progress=False,
    )
    assert tuned.val_acc > 0.5, tuned.val_acc
    ft = load_model(tmp_path / "ft")
    assert ft.config.grid_size == 6 and ft.pos_embed.shape[1] == 1 + 36


def test_hybrid_save_load_round_trip(tmp_path):
    model = create_model("R+Ti/4@32", depth=1, seed=3).eval()
    torch.nn.init.normal_(model.head.weight, std=0.05)
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config == model.config and back.config.resnet_layers == (2,)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_inference_keeps_no_stale_standardised_kernels():
    """Eager inference standardises each kernel once; a fused optimiser step (which changes
    weights without bumping their version counter) and a load_state_dict are still seen."""
    model = create_model("R+Ti/4@32", depth=1, seed=3)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    x = torch.randn(2, 3, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        model.eval()
        with torch.inference_mode():
            cached = model(x)
        with torch.enable_grad():
            fresh = model(x)
        torch.testing.assert_close(cached, fresh.detach())
        model.train()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    before = model(x).detach()
    other = create_model("R+Ti/4@32", depth=1, seed=4)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), other.eval()(x))
    assert not torch.allclose(before, model(x).detach())
