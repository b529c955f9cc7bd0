"""Hugging Face DINOv2 (the giant's SwiGLU MLP too) and CLIP image towers: parity with
transformers (random weights, small models), preprocessing, and what is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from vitkit import PRESETS, CheckpointError
from vitkit.data.preprocess import centre_crop, load_image, normalize, to_float
from vitkit.model import count_params
from vitkit.weights import guess_format, load_pretrained
from vitkit.weights.hf_families import (
    CLIP_PREPROCESSING,
    DINOV2_PREPROCESSING,
    config_from_clip,
    config_from_dinov2,
)

TOL = 1e-5
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28}
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
OPENAI = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights and layer-scale gains around 1, so that they
    differ from each other and from their init), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            gain = ("norm" in name and name.endswith("weight")) or name.endswith("lambda1")
            p.copy_(1 + 0.3 * noise if gain else 0.1 * noise)
    return model.eval()


def _saved(model: torch.nn.Module, directory):
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _images(size: int = 28) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


# -- DINOv2 -------------------------------------------------------------------------------
def _dinov2(transformers, registers: bool, **kw):
    if registers:
        config = transformers.Dinov2WithRegistersConfig(
            **SMALL, patch_size=14, mlp_ratio=2, num_register_tokens=3, **kw
        )
        return transformers.Dinov2WithRegistersModel(config)
    config = transformers.Dinov2Config(**SMALL, patch_size=14, mlp_ratio=2, **kw)
    return transformers.Dinov2Model(config)


@pytest.mark.parametrize(
    ("registers", "kw"),
    [
        (False, {}),
        # The tanh GELU, no qkv bias and another eps, all read from config.json.
        (True, {"hidden_act": "gelu_pytorch_tanh", "qkv_bias": False, "layer_norm_eps": 1e-5}),
    ],
)
def test_dinov2_tokens_and_pooled_features_match(transformers, tmp_path, registers, kw):
    ref = _randomise(_dinov2(transformers, registers, **kw))
    directory = _saved(ref, tmp_path / "hf")
    assert guess_format(directory) == "hf"
    model = load_pretrained(directory)
    c = model.config
    assert (c.patch_size, c.grid_size, c.num_classes, c.num_registers) == (
        14,
        2,
        0,
        3 if registers else 0,
    )
    # Register models fold [CLS]'s position embedding into the token, as timm's.
    assert c.layer_scale_init == 1e-5 and c.cls_pos_embed is not registers and not c.norm_pre
    assert c.act == ("gelu_tanh" if registers else "gelu") and c.qkv_bias is not registers
    x = _images()
    with torch.no_grad():
        theirs = ref(pixel_values=x)
        tokens = model.forward_features(x)
        _close(tokens, theirs.last_hidden_state)
        _close(model.forward_head(tokens, pre_logits=True), theirs.pooler_output)
        _close(model(x), theirs.pooler_output)  # no head: the pooled features


def test_dinov2_with_registers_resamples_position_embeddings_as_transformers(
    transformers, tmp_path
):
    # Its interpolate_pos_encoding is vitkit's rule (bicubic, antialiased); Dinov2Model's is
    # not antialiased, so only the register model is compared at another size.
    ref = _randomise(_dinov2(transformers, registers=True))
    model = load_pretrained(_saved(ref, tmp_path / "hf"))
    x = _images(42)
    with torch.no_grad():
        _close(model.forward_features(x), ref(pixel_values=x).last_hidden_state)


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_swiglu_tokens_and_pooled_features_match(transformers, tmp_path, registers):
    # Two thirds of 64 x 2 units, rounded up to a multiple of 8: 85 -> 88. hidden_act is
    # ignored by transformers' SwiGLU, which is SiLU whatever it says.
    kw = {"use_swiglu_ffn": True, "hidden_act": "gelu_pytorch_tanh"}
    ref = _randomise(_dinov2(transformers, registers, **kw))
    directory = _saved(ref, tmp_path / "hf")
    model = load_pretrained(directory)
    c = model.config
    assert (c.mlp, c.mlp_dim, c.act, c.num_registers) == ("swiglu", 88, "gelu", 3 * registers)
    assert model.blocks[0].mlp.fc1.weight.shape == (2 * 88, 64)
    # Less the mask token, and with registers [CLS]'s position embedding, folded into [CLS].
    theirs = sum(p.numel() for n, p in ref.named_parameters() if "mask_token" not in n)
    assert sum(p.numel() for p in model.parameters()) == theirs - 64 * registers
    x = _images()
    with torch.no_grad():
        out = ref(pixel_values=x)
        _close(model.forward_features(x), out.last_hidden_state)
        _close(model(x), out.pooler_output)
    # A file whose MLP is not the SwiGLU its config.json says is named.
    plain = _saved(_dinov2(transformers, registers), tmp_path / "plain")
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps(config | {"use_swiglu_ffn": True}))
    with pytest.raises(CheckpointError, match=r"lacks .*mlp\.weights_in"):
        load_pretrained(plain)


def test_dinov2_giant_config_counts_transformers_parameters(transformers, timm):
    """facebook/dinov2-giant's config.json fields (the rest transformers' defaults): the
    parameter count of transformers' model (less its pretraining mask token) and timm's."""
    giant = {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24}
    giant |= {"image_size": 518, "patch_size": 14, "use_swiglu_ffn": True}
    config = config_from_dinov2({"model_type": "dinov2", **giant})[0]
    assert (config.mlp, config.mlp_dim) == ("swiglu", 4096)
    with torch.device("meta"):  # 1.1 billion parameters: shapes only
        ref = transformers.Dinov2Model(transformers.Dinov2Config(**giant))
        theirs = sum(p.numel() for n, p in ref.named_parameters() if "mask_token" not in n)
        timms = timm.create_model("vit_giant_patch14_dinov2", pretrained=False)
    assert count_params(config) == theirs == sum(p.numel() for p in timms.parameters())


def test_dinov2_backbone_of_a_headless_classifier_loads(transformers, tmp_path):
    config = transformers.Dinov2Config(**SMALL, patch_size=14, mlp_ratio=2, num_labels=0)
    ref = _randomise(transformers.Dinov2ForImageClassification(config))
    model = load_pretrained(_saved(ref, tmp_path / "hf"))  # its tensors lie under "dinov2."
    x = _images()
    with torch.no_grad():
        _close(model.forward_features(x), ref.dinov2(pixel_values=x).last_hidden_state)


# -- CLIP ---------------------------------------------------------------------------------
def _clip_vision_config(transformers, **kw):
    return transformers.CLIPVisionConfig(
        **SMALL, intermediate_size=96, patch_size=14, projection_dim=24, **kw
    )


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_vision_model_pooled_features_match(transformers, tmp_path, act):
    config = _clip_vision_config(transformers, hidden_act=act)
    ref = _randomise(transformers.CLIPVisionModel(config))
    model = load_pretrained(_saved(ref, tmp_path / "hf"))
    c = model.config
    assert c.norm_pre and not c.fc_norm and c.pool == "cls" and c.num_classes == 0
    assert c.act == act and c.ln_eps == 1e-5 and c.mlp_dim == 96
    assert model.patch_embed.proj.bias is None
    x = _images()
    with torch.no_grad():
        theirs = ref(pixel_values=x)
        _close(model(x), theirs.pooler_output)
        # CLIP normalises only the pooled [CLS]; vitkit's tokens are every token normalised.
        _close(model.forward_features(x), ref.post_layernorm(theirs.last_hidden_state))


def test_clip_vision_model_with_projection_gives_image_embeds(transformers, tmp_path):
    ref = transformers.CLIPVisionModelWithProjection(_clip_vision_config(transformers))
    model = load_pretrained(_saved(_randomise(ref), tmp_path / "hf"))
    assert model.config.num_classes == 24 and not model.head.bias.any()
    x = _images()
    with torch.no_grad():
        _close(model(x), ref(pixel_values=x).image_embeds)


def test_clip_model_image_tower_and_projection(transformers, tmp_path):
    text = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 100,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    vision = _clip_vision_config(transformers).to_dict()
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    ref = _randomise(transformers.CLIPModel(config))
    model = load_pretrained(_saved(ref, tmp_path / "hf"))
    assert model.config.num_classes == 24 and model.labels is None
    x = _images()
    with torch.no_grad():
        features = ref.get_image_features(pixel_values=x)
        features = getattr(features, "pooler_output", features)  # transformers 5: an output
        _close(model(x), features)
        _close(
            model.forward_head(model.forward_features(x), pre_logits=True),
            ref.vision_model(pixel_values=x).pooler_output,
        )
        ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(2))
        joint = ref(input_ids=ids, pixel_values=x).image_embeds  # L2-normalised
        _close(F.normalize(model(x), dim=-1), joint)


def test_clip_files_of_older_transformers(transformers, tmp_path):
    """transformers 4 saved CLIPVisionModel under "vision_model." with its integer
    position_ids buffer."""
    ref = _randomise(transformers.CLIPVisionModel(_clip_vision_config(transformers)))
    directory = _saved(ref, tmp_path / "hf")
    state = load_file(directory / "model.safetensors")
    old = {"vision_model." + k.removeprefix("vision_model."): v for k, v in state.items()}
    old["vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)
    save_file(old, directory / "model.safetensors")
    model = load_pretrained(directory)
    x = _images()
    with torch.no_grad():
        _close(model(x), ref(pixel_values=x).pooler_output)


def test_hub_configs_give_vitkits_presets():
    """The config.json fields of facebook/dinov2-small, facebook/dinov2-with-registers-small
    and openai/clip-vit-base-patch16 (the rest transformers' defaults) are the presets'
    architectures; DINOv2's processor crops 224 of 256."""
    small = {"hidden_size": 384, "num_attention_heads": 6, "image_size": 518, "patch_size": 14}
    dino = config_from_dinov2({"model_type": "dinov2", **small})[0]
    assert dino.replace(**DINOV2_PREPROCESSING) == PRESETS["DINOv2-S/14"].replace(
        crop_pct=224 / 256
    )
    reg = config_from_dinov2({"model_type": "dinov2_with_registers", **small})[0]
    assert reg.replace(**DINOV2_PREPROCESSING) == PRESETS["DINOv2-S/14-reg4"].replace(
        crop_pct=224 / 256
    )
    clip = config_from_clip({"model_type": "clip", "vision_config": {"patch_size": 16}})
    assert clip.replace(num_classes=512, **CLIP_PREPROCESSING) == PRESETS["CLIP-B/16"]


def test_hub_names_read_every_family(transformers, tmp_path, monkeypatch):
    import huggingface_hub

    ref = _randomise(_dinov2(transformers, registers=True))
    directory = _saved(ref, tmp_path / "snapshots" / ("0" * 40))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(directory))
    model = load_pretrained("hf:facebook/dinov2-with-registers-small")
    assert model.config.source == f"hf:facebook/dinov2-with-registers-small@{'0' * 40}"
    x = _images()
    with torch.no_grad():
        _close(model(x), ref(pixel_values=x).pooler_output)


# -- preprocessing ------------------------------------------------------------------------
def _photo(path) -> Image.Image:
    """A smooth 320 x 240 colour image (resamplers differ little on it), saved as a PNG."""
    cells = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(cells).resize((320, 240), Image.Resampling.BICUBIC).save(path)
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("family", ["dinov2", "clip"])
def test_preprocessing_from_the_image_processor(transformers, tmp_path, family):
    if family == "dinov2":
        ref = _dinov2(transformers, registers=False)
        processor = transformers.BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, **IMAGENET
        )
        mean, std, crop_pct = IMAGENET["image_mean"], IMAGENET["image_std"], 224 / 256
    else:
        ref = transformers.CLIPVisionModel(_clip_vision_config(transformers))
        processor = transformers.CLIPImageProcessor()  # shortest edge 224, crop 224
        (mean, std), crop_pct = OPENAI, 1.0
    directory = _saved(ref, tmp_path / "hf")
    default = load_pretrained(directory).config  # no processor: the family's usual one
    processor.save_pretrained(directory)
    c = load_pretrained(directory).config
    assert (c.mean, c.std, c.interpolation) == (tuple(mean), tuple(std), "bicubic")
    assert c.crop_pct == pytest.approx(crop_pct)
    assert default == c
    # The pixels: vitkit's resize and crop of a photo against the processor's, within what
    # one resampling step (vitkit) against two (resize, then crop) moves smooth images.
    photo = _photo(tmp_path / "photo.png")
    theirs = transformers.AutoImageProcessor.from_pretrained(directory)(
        images=photo, return_tensors="pt"
    )["pixel_values"][0]
    pixels = load_image(
        tmp_path / "photo.png", 3, 224, c.interpolation, crop=centre_crop(c.crop_pct)
    )
    ours = normalize(to_float(pixels), c.mean, c.std)
    diff = (ours - theirs).abs() * torch.tensor(c.std).view(3, 1, 1)  # in [0, 1] units
    assert diff.mean() < 2 / 255 and diff.max() < 8 / 255
    # A processor that says otherwise is read: bilinear, a 200 / 256 crop, other statistics.
    other = processor.to_dict() | {"resample": 2, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    other |= {"size": {"shortest_edge": 256}, "crop_size": {"height": 200, "width": 200}}
    (directory / "preprocessor_config.json").write_text(json.dumps(other))
    c = load_pretrained(directory).config
    assert (c.interpolation, c.mean, c.std) == ("bilinear", (0.5,) * 3, (0.25,) * 3)
    assert c.crop_pct == pytest.approx(200 / 256)


# -- what is refused ----------------------------------------------------------------------
def test_classification_heads_vitkit_cannot_pool_are_refused(transformers, tmp_path):
    config = transformers.Dinov2Config(**SMALL, patch_size=14, mlp_ratio=2, num_labels=3)
    directory = _saved(transformers.Dinov2ForImageClassification(config), tmp_path / "d")
    with pytest.raises(CheckpointError, match=r"Dinov2ForImageClassification.*concatenated"):
        load_pretrained(directory)
    vision = _clip_vision_config(transformers).to_dict()
    config = transformers.CLIPConfig(vision_config=vision, num_labels=3)
    directory = _saved(transformers.CLIPForImageClassification(config), tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"CLIPForImageClassification.*LayerNorm"):
        load_pretrained(directory)


def test_other_model_types_are_refused_by_name(transformers, tmp_path):
    config = transformers.Siglip2VisionConfig(**SMALL, intermediate_size=96, patch_size=14)
    directory = _saved(transformers.Siglip2VisionModel(config), tmp_path / "siglip2")
    assert guess_format(directory) == "hf"
    with pytest.raises(CheckpointError, match=r"siglip2_vision_model: .*NaFlex"):
        load_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "beit"}))
    with pytest.raises(CheckpointError, match=r"model_type 'beit' is not one vitkit reads"):
        load_pretrained(directory)


def test_config_fields_are_checked_and_named(transformers, tmp_path):
    directory = _saved(_dinov2(transformers, registers=False), tmp_path / "hf")
    path = directory / "config.json"
    good = json.loads(path.read_text())
    bad = [
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"mlp_ratio": "4"}, "mlp_ratio"),
        ({"use_swiglu_ffn": "yes"}, "use_swiglu_ffn must be true or false"),
        ({"use_swiglu_ffn": True, "mlp_ratio": 1e9}, r"ViTConfig\.mlp_ratio must be in"),
        ({"hidden_size": 96}, r"model.safetensors does not match config.json"),
    ]
    for change, named in bad:
        path.write_text(json.dumps(good | change))
        with pytest.raises(CheckpointError, match=named):
            load_pretrained(directory)
    # A stray tensor is something vitkit does not build.
    path.write_text(json.dumps(good))
    state = load_file(directory / "model.safetensors")
    save_file(
        state | {"encoder.layer.0.extra.weight": torch.zeros(2)}, directory / "model.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"does not use: encoder.layer.0.extra.weight"):
        load_pretrained(directory)
