"""SigLIP image towers: attention pooling (pool="map") as an option of the one model, against
timm's and transformers' SigLIP (random weights, small models), and its preset."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from vitkit import PRESETS, CheckpointError, ViTConfig, create_model, load_model, save_model
from vitkit.model import count_params, flops
from vitkit.weights import load_pretrained
from vitkit.weights.hf_families import SIGLIP_PREPROCESSING, config_from_siglip
from vitkit.weights.timm import config_from_timm, from_timm, module_settings, to_timm

TIMM_NAME = "vit_base_patch16_siglip_224"
TINY = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, num_classes=3)
SMALL_HF = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "image_size": 32,
    "patch_size": 8,
}


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Max abs difference <= 1e-5, relative to the outputs' scale when they are large."""
    assert ours.shape == ref.shape
    scale = max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= 1e-5 * scale


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (the probe, the pool's norm and MLP too), in eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            std = 1 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * std + (0.0 if p.ndim > 1 else 0.5))
    return model.eval()


def _images(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- the option -----------------------------------------------------------------------------
def test_attention_pool_is_counted_and_reads_patch_tokens_only():
    config = TINY.replace(pool="map", num_registers=2)
    model = create_model(config, seed=0).eval()
    assert model.attn_pool is not None
    assert count_params(model) == count_params(config)
    d, m, n = config.width, config.mlp_dim, config.num_patches
    pool_params = d + 4 * (d * d + d) + 2 * d + 2 * d * m + m + d  # probe, q kv proj, norm, MLP
    assert count_params(config) == count_params(config.replace(pool="mean")) + pool_params
    pool_flops = 2 * (2 * d * d + 2 * n * d * d + 2 * d * m + 2 * n * d)
    assert flops(config) == flops(config.replace(pool="mean")) + pool_flops
    x = _images(32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        features = model.forward_head(tokens, pre_logits=True)
        assert features.shape == (2, d)
        changed = tokens.clone()
        changed[:, : config.num_prefix_tokens] += 1.0  # the registers: not read
        torch.testing.assert_close(model.forward_head(changed, pre_logits=True), features)
        changed[:, -1] += 1.0  # a patch token: read
        assert not torch.allclose(model.forward_head(changed, pre_logits=True), features)


def test_attention_pool_config_round_trip_and_new_size(tmp_path):
    model = _randomise(create_model(TINY.replace(pool="map", class_token=False), seed=0))
    assert ViTConfig.from_json(model.config.to_json()) == model.config
    loaded = load_model(save_model(model, tmp_path / "m"))
    assert loaded.config.pool == "map"
    x = _images(32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
        model.set_image_size(48)
        assert model(_images(48)).shape == (2, 3)
    for preset in ("SigLIP-B/16", "B/16"):  # a new config and an old one load as they were
        assert ViTConfig.from_json(PRESETS[preset].to_json()) == PRESETS[preset]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pool": "attention"}, "ViTConfig.pool must be"),
        ({"pool": "map", "distilled": True}, "distilled=True .* needs pool='cls'"),
        ({"pool": "cls", "class_token": False}, "pool='mean' or 'map' without one"),
    ],
)
def test_bad_pool_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig.from_dict(TINY.to_dict() | overrides)


# -- timm -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_timm_siglip_parity(timm):
    ref = timm.create_model(TIMM_NAME, pretrained=False, depth=2, img_size=64, num_classes=5)
    ref = _randomise(ref)
    model = from_timm(ref)
    c = model.config
    assert (c.pool, c.class_token, c.cls_pos_embed, c.heads, c.act) == (
        "map",
        False,
        False,
        12,
        "gelu",
    )
    assert count_params(model) == sum(p.numel() for p in ref.parameters())
    x = _images(64)
    with torch.no_grad():
        assert_close(model.forward_features(x), ref.forward_features(x))
        tokens = model.forward_features(x)
        pooled = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert_close(model.forward_head(tokens, pre_logits=True), pooled)
        assert_close(model(x), ref(x))
        model.set_image_size(96)
        ref.set_input_size(img_size=(96, 96))
        bigger = _images(96)
        assert_close(model(bigger), ref(bigger))
    ref.load_state_dict(to_timm(model))  # and back


def test_timm_siglip_file_takes_the_family_settings(timm, tmp_path):
    """A weights file with timm's config.json: SigLIP's heads and its trained GELU (tanh);
    act="gelu" gives timm's own numbers."""
    ref = _randomise(
        timm.create_model(TIMM_NAME, pretrained=False, depth=2, img_size=32, embed_dim=96)
    )
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    hub = {"architecture": f"{TIMM_NAME}.v2_webli", "global_pool": "map", "pretrained_cfg": {}}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    model = from_timm(tmp_path / "model.safetensors")
    assert (model.config.heads, model.config.act, model.config.pool) == (12, "gelu_tanh", "map")
    x = _images(32)
    with torch.no_grad():
        assert_close(from_timm(tmp_path / "model.safetensors", act="gelu")(x), ref(x))


def test_timm_attention_pool_variants_are_refused_by_name(timm):
    with torch.device("meta"):
        state = timm.create_model(TIMM_NAME, pretrained=False, depth=1).state_dict()
    state["attn_pool.q_norm.weight"] = torch.empty(64, device="meta")
    with pytest.raises(CheckpointError, match=r"attention pool with .*qk_norm.*q_norm"):
        config_from_timm(state)


def test_preset_is_timms_and_hugging_faces_model(timm):
    with torch.device("meta"):  # shapes only
        ref = timm.create_model(TIMM_NAME, pretrained=False)
    preset = PRESETS["SigLIP-B/16"]
    assert count_params(preset) == sum(p.numel() for p in ref.parameters()) == 92_884_224
    # timm runs the weights with exact GELU and crops 0.9; the preset keeps them as trained.
    converted = config_from_timm(ref.state_dict(), **module_settings(ref))
    assert converted.replace(act="gelu_tanh", crop_pct=1.0) == preset
    # google/siglip-base-patch16-224: transformers' defaults.
    assert config_from_siglip({"model_type": "siglip"}).replace(**SIGLIP_PREPROCESSING) == preset


# -- Hugging Face ---------------------------------------------------------------------------
def _saved(model: torch.nn.Module, directory):
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def test_hf_siglip_vision_model_parity(transformers, tmp_path):
    ref = _randomise(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL_HF)))
    directory = _saved(ref, tmp_path / "hf")
    model = load_pretrained(directory)
    c = model.config
    assert (c.pool, c.class_token, c.act, c.num_classes, c.heads) == (
        "map",
        False,
        "gelu_tanh",
        0,
        4,
    )
    assert (c.mean, c.interpolation, c.crop_pct) == ((0.5,) * 3, "bicubic", 1.0)
    x = _images(32)
    with torch.no_grad():
        out = ref(pixel_values=x)
        assert_close(model.forward_features(x), out.last_hidden_state)
        assert_close(model(x), out.pooler_output)
    # The processor's resampling is the model's.
    processor = transformers.SiglipImageProcessor(resample=2, size={"height": 32, "width": 32})
    processor.save_pretrained(directory)
    assert load_pretrained(directory).config.interpolation == "bilinear"


def test_hf_siglip_model_image_tower(transformers, tmp_path):
    text = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 100,
    }
    config = transformers.SiglipConfig(text_config=text, vision_config=SMALL_HF)
    ref = _randomise(transformers.SiglipModel(config))
    model = load_pretrained(_saved(ref, tmp_path / "hf"))
    x = _images(32)
    with torch.no_grad():
        features = ref.get_image_features(pixel_values=x)
        features = getattr(features, "pooler_output", features)  # transformers 5: an output
        assert_close(model(x), features)


def test_hf_siglip_without_its_head_is_refused(transformers, tmp_path):
    config = transformers.SiglipVisionConfig(**SMALL_HF, vision_use_head=False)
    directory = _saved(transformers.SiglipVisionModel(config), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="vision_use_head false"):
        load_pretrained(directory)
