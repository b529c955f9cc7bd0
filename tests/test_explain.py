"""Explanations: rollout on a case with a known answer, maps that are distributions, the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit import create_model, save_model
from vitkit.cli import main
from vitkit.infer.explain import METHODS, attention_maps, explain_image, rollout

TARGET = 37  # the patch every token is made to attend to (row 5, column 2 of a 7x7 grid)


def _attending_to_one_patch():
    """A model whose every attention head puts (almost) all weight on patch TARGET.

    Only that patch's position embedding is non-zero, so after LayerNorm only its key is
    non-zero; every query is a constant aligned with it. Attention and MLP outputs are zeroed,
    so every layer sees the same tokens.
    """
    model = create_model("Ti/4@28", width=64, heads=2, depth=3, seed=0).eval()
    u = torch.randn(64)
    u = (u - u.mean()) / u.std(unbiased=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
        model.pos_embed[0, 1 + TARGET] = u
        for block in model.blocks:
            block.attn.qkv.weight[64:128] = torch.eye(64)  # key = LN(token)
            block.attn.qkv.bias[:64] = 4.0 * u  # the same query for every token
        torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def test_rollout_lights_the_patch_attention_is_forced_onto():
    model = _attending_to_one_patch()
    x = torch.zeros(1, 1, 28, 28)
    for method in ("rollout", "last-layer"):
        _, maps = attention_maps(model, x, method)
        flat = maps.reshape(-1, 49)  # last-layer: one map per head
        assert (flat.argmax(dim=-1) == TARGET).all(), method
        assert (flat[:, TARGET] > 0.9).all(), (method, flat[:, TARGET])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pool": "mean", "class_token": False},
        {"num_registers": 2},
        {"resnet_layers": (1,), "resnet_width": 32, "resnet_stem": "small"},
    ],
)
def test_maps_are_distributions_at_any_size(overrides):
    model = create_model("Ti/4@28", width=64, heads=2, depth=2, seed=1, **overrides).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    for size, grid in ((28, 7), (56, 14)):
        x = torch.randn(2, 1, size, size)
        for method in METHODS:
            logits, maps = attention_maps(model, x, method)
            expected = (2, 2, grid, grid) if method == "last-layer" else (2, grid, grid)
            assert maps.shape == expected and logits.shape == (2, 10)
            torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(expected[:-2]))
            assert (maps >= 0).all()
    # The rollout matrix itself is row-stochastic, whatever the fusion and discarding.
    _, attentions = model.forward_with_attention(torch.randn(2, 1, 28, 28))
    for fusion in ("mean", "max", "min"):
        r = rollout(attentions, fusion, discard_ratio=0.5)
        torch.testing.assert_close(r.sum(dim=-1), torch.ones(r.shape[:-1]))


def test_grad_rollout_depends_on_the_class():
    model = create_model("Ti/4@28", width=64, heads=2, depth=2, seed=2).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    x = torch.randn(1, 1, 28, 28)
    _, a = attention_maps(model, x, "grad-rollout", target=0)
    _, b = attention_maps(model, x, "grad-rollout", target=1)
    assert not torch.allclose(a, b)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_explain_image_and_command(tmp_path, capsys):
    model = _attending_to_one_patch()
    model.labels = [f"c{i}" for i in range(10)]
    save_model(model, tmp_path / "m")
    Image.fromarray(np.zeros((40, 30), dtype=np.uint8)).save(tmp_path / "img.png")
    exp = explain_image(model, tmp_path / "img.png", method="last-layer")
    assert exp.image.size == (28, 28) and exp.head_maps.shape == (2, 7, 7)
    assert np.unravel_index(exp.heatmap.argmax(), (7, 7)) == divmod(TARGET, 7)
    assert exp.overlay().size == (224, 224)
    out = tmp_path / "fig.png"
    args = ["explain", str(tmp_path / "m"), str(tmp_path / "img.png"), "--out", str(out)]
    assert main([*args, "--overlay", str(tmp_path / "ov.png"), "--target", "c3"]) == 0
    assert Image.open(out).size[0] > 200 and Image.open(tmp_path / "ov.png").size == (224, 224)
    assert "img.png: c" in capsys.readouterr().out
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["explain", str(tmp_path / "m"), str(tmp_path / "bad.png")]) == 1
    assert "cannot read image" in capsys.readouterr().err
    assert main([*args, "--target", "nope"]) == 2
