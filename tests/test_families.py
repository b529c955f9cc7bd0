"""The ViTs people start from, as options of the one model: DeiT (distilled too), DeiT-III,
DINOv2 (with registers; the giant's SwiGLU MLP), MAE and CLIP's image tower, each against
timm's model of it."""

import functools
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vitkit import PRESETS, CheckpointError, ViTConfig, create_model, load_model, save_model
from vitkit.data.preprocess import centre_crop, load_image, preprocess
from vitkit.model import count_params, flops
from vitkit.weights.timm import (
    config_from_timm,
    from_timm,
    hub_settings,
    module_settings,
    to_timm,
)

# timm name, image size, and the options its conversion must have. Two blocks and small
# images keep each model a second or so; widths and heads are the named model's.
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", 64, {}),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", 64, {"distilled": True}),
    "deit3": ("deit3_small_patch16_224", 64, {"layer_scale_init": 1e-6, "cls_pos_embed": False}),
    "dinov2": ("vit_small_patch14_dinov2", 56, {"layer_scale_init": 1e-5, "num_classes": 0}),
    "dinov2-reg4": (
        "vit_small_patch14_reg4_dinov2",
        56,
        {"num_registers": 4, "cls_pos_embed": False, "layer_scale_init": 1e-5},
    ),
    # The giant's blocks (SwiGLUPacked, SiLU, its mlp_ratio), narrowed in FAMILY_ARGS: fc1
    # gives int(384 * 2.66667 * 2) = 2048 outputs, a gate and a value of 1024 units each.
    "dinov2-giant": (
        "vit_giant_patch14_dinov2",
        56,
        {"mlp": "swiglu", "mlp_dim": 1024, "layer_scale_init": 1e-5, "num_classes": 0},
    ),
    # MAE's pretrained encoder: the plain ViT, [CLS] pooled, no head.
    "mae": ("vit_base_patch16_224.mae", 32, {"num_classes": 0, "pool": "cls", "fc_norm": False}),
    # timm's default tag for the plain name (laion2b) was trained with GELU.
    "clip": ("vit_base_patch16_clip_224", 64, {"norm_pre": True, "ln_eps": 1e-5, "act": "gelu"}),
    "clip-quickgelu": (
        "vit_base_patch16_clip_quickgelu_224",
        64,
        {"norm_pre": True, "ln_eps": 1e-5, "act": "quick_gelu", "num_classes": 512},
    ),
}
# timm model arguments beyond depth and image size, where a family needs them.
FAMILY_ARGS = {"dinov2-giant": {"embed_dim": 384, "num_heads": 6}}
# The presets and the timm models (with their pretrained_cfg) they describe.
PRESET_MODELS = {
    "DeiT-S/16": "deit_small_patch16_224",
    "DeiT-B/16-distilled": "deit_base_distilled_patch16_224",
    "DeiT3-S/16": "deit3_small_patch16_224",
    "DINOv2-S/14": "vit_small_patch14_dinov2",
    "DINOv2-S/14-reg4": "vit_small_patch14_reg4_dinov2",
    "CLIP-B/16": "vit_base_patch16_clip_quickgelu_224.openai",
}


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Max abs difference <= 1e-5, relative to the outputs' scale when they are large."""
    assert ours.shape == ref.shape
    scale = max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= 1e-5 * scale


def _randomise(model: torch.nn.Module) -> None:
    """Every parameter random: zero heads and layer-scale gains of 1e-6 would hide mistakes."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            std = 1 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * std + (0.0 if p.ndim > 1 else 0.5))


def _timm_model(timm, name: str, size: int, **kw):
    ref = timm.create_model(name, pretrained=False, depth=2, img_size=size, **kw).eval()
    _randomise(ref)
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_parity_at_native_and_new_resolution(timm, family):
    name, size, options = FAMILIES[family]
    ref = _timm_model(timm, name, size, **FAMILY_ARGS.get(family, {}))
    model = from_timm(ref)
    c = model.config
    assert {k: getattr(c, k) for k in options} == options
    assert c.heads == ref.blocks[0].attn.num_heads and c.depth == 2 and c.image_size == size
    assert c.mean == ref.pretrained_cfg["mean"] and c.std == ref.pretrained_cfg["std"]
    assert count_params(model) == count_params(c) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert_close(model.forward_features(x), ref.forward_features(x))
        assert_close(model(x), ref(x))  # logits, or pooled features of headless models
        # A new grid: timm resamples its position embeddings as vitkit does (bicubic,
        # antialiased, prefix embeddings kept), so the outputs agree as closely.
        new = size + 2 * c.patch_size
        bigger = torch.randn(2, 3, new, new)
        on_the_fly = model(bigger)
        model.set_image_size(new)
        ref.set_input_size(img_size=(new, new))
        assert model.pos_embed.shape == ref.pos_embed.shape
        assert_close(model(bigger), ref(bigger))
        torch.testing.assert_close(model(bigger), on_the_fly, atol=1e-6, rtol=0)
    ref.load_state_dict(to_timm(model))  # and back: timm takes vitkit's weights as they are


@pytest.mark.parametrize("preset", list(PRESET_MODELS))
def test_presets_are_timms_models(timm, preset):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        ref = timm.create_model(PRESET_MODELS[preset], pretrained=False)
    assert count_params(PRESETS[preset]) == sum(p.numel() for p in ref.parameters())
    # The architecture and normalisation are those of timm's model; presets keep crop 1.0.
    converted = config_from_timm(ref.state_dict(), **module_settings(ref))
    assert converted.replace(crop_pct=1.0) == PRESETS[preset]


def test_converted_model_round_trips_through_save_and_load(timm, tmp_path):
    ref = _timm_model(timm, "deit_tiny_distilled_patch16_224", 64, num_classes=5)
    model = from_timm(ref)
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config == model.config and back.config.distilled
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["distilled"] is True and saved["act"] == "gelu" and saved["crop_pct"] == 0.9
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)
    for name in ("vit_small_patch14_reg4_dinov2", "vit_base_patch16_clip_quickgelu_224"):
        config = from_timm(_timm_model(timm, name, 56 if "dinov2" in name else 32)).config
        assert ViTConfig.from_json(config.to_json()) == config


def test_new_fields_default_to_the_papers_vit_and_are_checked():
    # A config.json written before these options existed loads as the paper's ViT.
    old = ViTConfig().to_dict()
    for key in ("distilled", "layer_scale_init", "norm_pre", "act", "mlp"):
        del old[key]
    assert ViTConfig.from_dict(old) == ViTConfig()
    bad = [
        ({"layer_scale_init": 0.0}, "layer_scale_init must be None or in"),
        ({"layer_scale_init": math.nan}, "layer_scale_init must be finite"),
        ({"layer_scale_init": "1e-5"}, "layer_scale_init must be"),
        ({"act": "relu"}, "act must be"),
        ({"mlp": "geglu"}, "mlp must be"),
        ({"mlp": "swiglu", "act": "quick_gelu"}, "a SwiGLU MLP's is SiLU"),
        ({"mlp": "swiglu", "pool": "map", "class_token": False}, "not a model vitkit builds"),
        ({"norm_pre": 1}, "norm_pre must be bool"),
        ({"distilled": True, "pool": "mean"}, "distilled=True .* needs pool='cls'"),
        ({"distilled": True, "class_token": False}, "pool='cls' needs class_token"),
    ]
    for patch, message in bad:
        with pytest.raises(ValueError, match=message):
            ViTConfig.from_dict(ViTConfig().to_dict() | patch)


# Every option at once, on a small model.
ALL_OPTIONS = {
    "distilled": True,
    "num_registers": 2,
    "cls_pos_embed": False,
    "layer_scale_init": 1e-5,
    "norm_pre": True,
    "act": "quick_gelu",
}


@pytest.mark.parametrize(
    "overrides",
    [
        ALL_OPTIONS,
        {**ALL_OPTIONS, "cls_pos_embed": True, "act": "gelu_tanh"},
        {**ALL_OPTIONS, "act": "gelu", "mlp": "swiglu"},
    ],
)
def test_options_train_explain_and_resample(overrides):
    model = create_model("Ti/4@28", depth=2, drop_path=0.0, **overrides)
    for head in (model.head, model.head_dist):
        torch.nn.init.normal_(head.weight, std=0.02)
    x = torch.randn(3, 1, 28, 28)
    model(x).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        logits, maps = model.forward_with_attention(x)
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=0)
        t = model.config.num_patches + model.config.num_prefix_tokens
        assert maps[0].shape == (3, 3, t, t) and model.config.num_prefix_tokens == 4
        model.set_image_size(36)
        assert model(torch.randn(1, 1, 36, 36)).shape == (1, 10)


def test_distilled_heads_average_in_training_and_reset_together():
    model = create_model("Ti/4@28", depth=1, distilled=True)
    assert model.head_dist.weight.abs().sum() == 0 and model.dist_token.std() > 0.01
    torch.nn.init.normal_(model.head.weight)
    torch.nn.init.normal_(model.head_dist.weight)
    tokens = model.forward_features(torch.randn(2, 1, 28, 28))
    cls, dist = tokens[:, 0], tokens[:, 1]
    want = (model.head(cls) + model.head_dist(dist)) / 2
    for training in (True, False):
        model.train(training)
        torch.testing.assert_close(model.forward_head(tokens), want)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), (cls + dist) / 2)
    model.reset_head(3)
    assert model.head.weight.shape == model.head_dist.weight.shape == (3, 192)
    assert model.head_dist.weight.abs().sum() == 0
    plain = model.config.replace(distilled=False)
    assert flops(model.config) - flops(plain) > 2 * 192 * 3  # a token more, and a head


@pytest.mark.slow
def test_clip_activation_follows_the_weights(timm, tmp_path):
    # timm runs OpenAI's CLIP weights with GELU under the plain name and notes that they are
    # "natively QuickGELU": vitkit runs them as trained, or as timm does when asked.
    ref = _timm_model(timm, "vit_base_patch16_clip_224.openai", 32)
    assert from_timm(ref).config.act == "quick_gelu"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(from_timm(ref, act="gelu")(x), ref(x))
    # A weights file alone says nothing of eps or activation; timm's config.json beside it
    # (as a Hub repository holds it) names the architecture.
    from timm.models._hub import save_config_for_hf

    ref = _timm_model(timm, "vit_base_patch16_clip_quickgelu_224", 32)
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    bare = from_timm(tmp_path / "model.safetensors").config
    assert (bare.act, bare.ln_eps) == ("gelu", 1e-6)
    save_config_for_hf(ref, tmp_path / "config.json")
    model = from_timm(tmp_path / "model.safetensors")
    assert (model.config.act, model.config.ln_eps, model.config.heads) == ("quick_gelu", 1e-5, 12)
    with torch.no_grad():
        assert_close(model(x), ref(x))


def test_head_counts_come_from_the_source(timm, tmp_path):
    # CLIP's giant towers are 1408 wide with 16 heads, not 64-wide heads: the architecture's
    # name says so, and so does a timm model itself.
    with torch.device("meta"):
        ref = timm.create_model("vit_giant_patch14_clip_224", pretrained=False, depth=1)
    state = ref.state_dict()
    assert config_from_timm(state, **module_settings(ref)).heads == 16
    hub = {"architecture": "vit_giant_patch14_clip_224.laion2b", "pretrained_cfg": {}}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert config_from_timm(state, **hub_settings(tmp_path / "config.json")).heads == 16
    assert config_from_timm(state).heads == 22  # weights alone: 64-wide heads
    hub["model_args"] = {"num_heads": 11}  # a model built with other heads says so
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert config_from_timm(state, **hub_settings(tmp_path / "config.json")).heads == 11


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("eva02_tiny_patch14_224", {}, r"timm's Eva is not a ViT vitkit builds"),
        ("vit_small_patch16_224", {"depth": 1, "global_pool": "prr"}, r"global_pool 'prr'"),
        ("vit_small_patch16_224", {"depth": 1, "qk_norm": True}, "q_norm"),
    ],
)
def test_unsupported_timm_models_refused_by_name(timm, name, kwargs, message):
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(CheckpointError, match=message):
        from_timm(ref)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("eva02_tiny_patch14_224", {}, r"q and v biases .*EVA.*: unsupported tensors"),
        ("vit_small_patch16_224", {"depth": 1, "reg_tokens": 2}, "position embeddings for regist"),
    ],
)
def test_unsupported_timm_weights_refused_by_name(timm, name, kwargs, message):
    with torch.device("meta"):  # refused from the names and shapes, before any value is read
        state = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    with pytest.raises(CheckpointError, match=message):
        config_from_timm(state)


@pytest.mark.parametrize(
    "option",
    [{"distilled": True}, {"layer_scale_init": 1e-5}, {"norm_pre": True}, {"act": "quick_gelu"}],
)
def test_hugging_face_export_refuses_what_its_vit_lacks(tmp_path, option):
    from vitkit.weights.hf import to_hf

    model = create_model("Ti/4@28", depth=1, num_classes=3, **option)
    with pytest.raises(CheckpointError, match="cannot be exported"):
        to_hf(model, tmp_path / "hf")


# -- SwiGLU (DINOv2's giant) and MAE ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_giant_patch14_dinov2", "vit_giant_patch14_reg4_dinov2"])
def test_dinov2_giant_config_is_timms_model(timm, name):
    with torch.device("meta"):  # 1.1 billion parameters: shapes only
        ref = timm.create_model(name, pretrained=False)
    config = config_from_timm(ref.state_dict(), **module_settings(ref))
    assert (config.mlp, config.mlp_dim, config.width, config.depth, config.heads) == (
        "swiglu",
        4096,
        1536,
        40,
        24,
    )
    assert count_params(config) == sum(p.numel() for p in ref.parameters()) > 1_136_000_000
    # SwiGLU's three matrices: half as much again as a plain MLP of as many units.
    plain = config.replace(mlp="mlp")
    tokens = config.num_patches + config.num_prefix_tokens
    assert flops(config) - flops(plain) == 2 * config.depth * tokens * config.width * 4096


def test_swiglu_model_round_trips_through_save_and_load(timm, tmp_path):
    ref = _timm_model(timm, "vit_giant_patch14_dinov2", 28, embed_dim=96, num_heads=2)
    model = from_timm(ref)
    save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["mlp"] == "swiglu"
    back = load_model(tmp_path / "m")
    assert back.config == model.config
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)
        assert_close(back(x), ref(x))


def test_swiglu_layers_vitkit_does_not_build_are_refused(timm):
    layers = timm.layers
    refused = [
        # A GLU whose tensors would load but compute something else: the gate last, or GELU.
        (layers.GluMlp, torch.nn.SiLU, r"GluMlp with SiLU, gate last"),
        (functools.partial(layers.GluMlp, gate_last=False), torch.nn.GELU, r"GluMlp with GELU"),
        (layers.SwiGLU, torch.nn.SiLU, r"timm's SwiGLU MLP is not one vitkit builds"),
    ]
    for mlp_layer, act_layer, message in refused:
        with torch.device("meta"):
            ref = timm.create_model(
                "vit_small_patch16_224", depth=1, mlp_layer=mlp_layer, act_layer=act_layer
            )
        with pytest.raises(CheckpointError, match=message):
            from_timm(ref)
    # timm's unpacked SwiGLU, from its tensors alone.
    with pytest.raises(CheckpointError, match=r"SwiGLU MLP laid out otherwise .*fc1_g"):
        config_from_timm(ref.state_dict())


@pytest.mark.parametrize("fine_tuned", [False, True])
def test_mae_checkpoint_loads_without_its_decoder(timm, tmp_path, fine_tuned):
    from timm.models._hub import save_config_for_hf

    # timm's MAE weights are the pretrained encoder, [CLS] pooled; MAE's fine-tuned models
    # average the patch tokens and normalise after pooling (fc_norm), under a head.
    kw = {"global_pool": "avg", "num_classes": 5} if fine_tuned else {}
    ref = _timm_model(timm, "vit_base_patch16_224.mae", 32, **kw)
    state = ref.state_dict()
    save_config_for_hf(ref, tmp_path / "config.json")
    # Meta's pretraining checkpoints keep the decoder beside the encoder; vitkit drops it.
    decoder = {
        "mask_token": torch.zeros(1, 1, 16),
        "decoder_embed.weight": torch.zeros(16, 768),
        "decoder_embed.bias": torch.zeros(16),
        "decoder_pos_embed": torch.zeros(1, 5, 16),
        "decoder_blocks.0.attn.qkv.weight": torch.zeros(48, 16),
        "decoder_blocks.0.mlp.fc1.weight": torch.zeros(64, 16),
        "decoder_norm.weight": torch.ones(16),
        "decoder_pred.weight": torch.zeros(768, 16),
    }
    save_file(state | decoder, tmp_path / "model.safetensors")
    model = from_timm(tmp_path / "model.safetensors")
    c = model.config
    want = (5, "mean", True) if fine_tuned else (0, "cls", False)
    assert (c.num_classes, c.pool, c.fc_norm) == want
    assert (c.mean, c.std, c.crop_pct) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.9)
    assert count_params(model) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model.forward_features(x), ref.forward_features(x))
        assert_close(model(x), ref(x))
    # Only the decoder's names are dropped: any other stray tensor is still refused.
    save_file(state | {"decoder_extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unsupported tensors decoder_extra.weight"):
        from_timm(tmp_path / "model.safetensors")


# Each family's preprocessing as timm's pretrained_cfg states it: mean/std, crop, resampling;
# and the size to test it at (a crop of 0.9 is tested at 224 px: timm rounds the resized side
# to whole pixels, a larger share of a small image).
END_TO_END = {"deit": 224, "dinov2": 56, "clip-quickgelu": 64, "mae": 224}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(END_TO_END))
def test_an_image_file_gives_timms_outputs_through_its_own_transform(timm, tmp_path, family):
    """From a photo file to outputs: vitkit's decoding and preprocessing (read from the
    checkpoint) against timm's `create_transform` with the model's pretrained config."""
    name, size = FAMILIES[family][0], END_TO_END[family]
    ref = _timm_model(timm, name, size, **FAMILY_ARGS.get(family, {}))
    model = from_timm(ref)
    data = timm.data.resolve_data_config({"input_size": (3, size, size)}, model=ref)
    assert model.config.crop_pct == data["crop_pct"]
    assert model.config.interpolation == data["interpolation"]
    pixels = torch.rand(3, 9, 12, generator=torch.Generator().manual_seed(0))
    photo = Image.fromarray((pixels * 255).byte().permute(1, 2, 0).numpy())
    path = tmp_path / "photo.png"
    photo.resize((3 * size, 2 * size), Image.Resampling.BICUBIC).save(path)
    with Image.open(path) as img:
        theirs = timm.data.create_transform(**data)(img.convert("RGB"))[None]
    c = model.config
    x = load_image(path, 3, c.image_size, c.interpolation, crop=centre_crop(c.crop_pct))
    ours = preprocess(x[None], c)
    # The same pixels to within a few 8-bit levels (both resize with Pillow's bicubic; timm
    # resizes then crops, vitkit crops then resizes once).
    levels = (ours - theirs).abs() * torch.tensor(c.std)[:, None, None] * 255
    assert levels.mean() < 1.0 and levels.max() <= 6
    with torch.no_grad():
        got, want = model(ours), ref(theirs)
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
