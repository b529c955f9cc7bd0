import pytest
import torch

from vitkit import PRESETS, create_model
from vitkit.model import count_params, resample_pos_embed

PAPER_PARAMS = {
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "B/16": 86_567_656,
    "L/16": 304_326_632,
    "H/14": 632_045_800,
    # The hybrid R50+ViT-B/16: timm's vit_base_r50_s16_384 has as many (tests/test_convert.py).
    "R50+B/16@384": 98_950_952,
    "R50+B/16": 98_659_112,
}
SMALL_HYBRID = {
    "resnet_layers": (1, 1),
    "resnet_width": 32,
    "resnet_stem": "small",
    "patch_size": 2,
    "width": 64,
    "heads": 2,
    "depth": 2,
}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    # Counted on a model built on the meta device: the real modules, no memory.
    assert count_params(PRESETS[name].replace(num_classes=1000)) == PAPER_PARAMS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_paper_parameter_counts_of_built_models(name):
    assert count_params(create_model(name, num_classes=1000)) == PAPER_PARAMS[name]


# Building and running these takes seconds each: in the full suite only.
_LARGE = ("B/16", "B/32", "R50+B/16", "R50+B/16@384", "DeiT-B/16-distilled", "CLIP-B/16")
_LARGE += ("SigLIP-B/16",)
_LARGE += ("DINOv2-S/14", "DINOv2-S/14-reg4")  # 518 px: 1,369 patches


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in _LARGE else n
        for n in PRESETS
        if n not in ("L/16", "H/14")
    ],
)
def test_output_shapes_every_preset(name):
    model = create_model(name, num_classes=7).eval()
    c = model.config
    x = torch.randn(2, c.in_channels, c.image_size, c.image_size)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, c.num_patches + c.num_prefix_tokens, c.width)
        assert model.forward_head(tokens, pre_logits=True).shape == (2, c.width)
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", ["L/16", "H/14"])
def test_output_shapes_large_presets(name):
    # Build at reduced depth to keep memory and time small; width and patch are the preset's.
    model = create_model(name, depth=1, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def _random_head(model):
    torch.nn.init.normal_(model.head.weight, std=0.02)


@pytest.mark.parametrize("overrides", [{"num_registers": 2}, SMALL_HYBRID])
def test_gradients_reach_every_parameter(overrides):
    model = create_model("Ti/4@28", drop_path=0.0, **overrides)
    _random_head(model)
    for m in model.modules():  # blocks of a fresh ResNet start as the identity
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.1)
    loss = model(torch.randn(4, 1, 28, 28)).logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pool": "mean", "class_token": False},
        {"num_registers": 4, "cls_pos_embed": False},
        SMALL_HYBRID,
    ],
)
def test_attention_path_matches_fused_path(overrides):
    model = create_model("Ti/4@32", **overrides).eval()
    _random_head(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        logits, maps = model.forward_with_attention(x)
    torch.testing.assert_close(logits, fused, atol=1e-5, rtol=0)
    t = model.config.num_patches + model.config.num_prefix_tokens
    assert len(maps) == model.config.depth
    for a in maps:
        assert a.shape == (3, model.config.heads, t, t)
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


def test_pos_embed_resample_identity_at_same_grid():
    pos = torch.randn(1, 1 + 49, 8)
    assert resample_pos_embed(pos, (7, 7), 1) is pos
    out = resample_pos_embed(pos, (10, 10), 1)
    assert out.shape == (1, 101, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])


def test_other_resolution_on_the_fly_and_at_load():
    model = create_model("Ti/4@28").eval()
    _random_head(model)
    with torch.no_grad():
        x = torch.randn(2, 1, 28, 28)
        same = model(x)
        bigger = torch.nn.functional.interpolate(x, size=(40, 36), mode="bilinear")
        on_the_fly = model(bigger)
        assert on_the_fly.shape == (2, 10) and torch.isfinite(on_the_fly).all()
        torch.testing.assert_close(model(x), same)  # the model itself is unchanged
        model.set_image_size(40)
        assert model.config.image_size == 40 and model.pos_embed.shape == (1, 101, 192)
        resized = model(torch.nn.functional.interpolate(x, size=40, mode="bilinear"))
    assert torch.isfinite(resized).all()
    # A smooth upsampling of the image keeps most predictions.
    assert (resized.argmax(-1) == same.argmax(-1)).float().mean() >= 0.5


def test_same_seed_same_weights_and_fresh_seed_differs():
    a = create_model("Ti/4@28", seed=3).state_dict()
    b = create_model("Ti/4@28", seed=3).state_dict()
    c = create_model("Ti/4@28", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_init_follows_reference():
    model = create_model("S/16", seed=0)
    assert torch.count_nonzero(model.head.weight) == 0
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0 + 1e-6
    assert model.pos_embed.std().item() == pytest.approx(0.02, abs=0.002)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 28, 28), "1-channel images, got 3"),
        ((1, 1, 3, 3), "smaller than one 4x4 patch"),
        ((1, 1, 30, 28), "not a multiple of the patch size"),
        ((1, 28, 28), "shape \\(B, C, H, W\\)"),
    ],
)
def test_bad_inputs_rejected(shape, message):
    model = create_model("Ti/4@28")
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_stochastic_depth_only_in_training():
    model = create_model("Ti/4@28", drop_path=0.5)
    _random_head(model)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_hybrid_tokens_come_from_the_cnn_map():
    # Small stem (stride 1), two stages (stride 2), 2x2 patches: 4 px per token, 7x7 tokens.
    model = create_model("Ti/4@28", **SMALL_HYBRID).eval()
    c = model.config
    assert (c.cnn_stride, c.token_stride, c.grid_size, c.cnn_channels) == (2, 4, 7, 256)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feature_map = model.patch_embed.backbone(x)
        assert feature_map.shape == (2, 256, 14, 14)
        assert model.forward_features(x).shape == (2, 1 + 49, 64)
        assert model(torch.randn(1, 1, 56, 56)).shape == (1, 10)  # 14x14 tokens, resampled
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model(torch.randn(1, 1, 30, 30))
    r50 = PRESETS["R50+B/16@384"]
    assert (r50.token_stride, r50.grid_size, r50.num_pos_embeds) == (16, 24, 577)
