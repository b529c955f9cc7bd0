"""CLIP's two towers: parity with Hugging Face's CLIPModel and OpenCLIP (random weights
written by each), vitkit's own CLIP directory, and bad files refused by name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitkit.benchmark import declare_torchvision_ops
from vitkit.config import TextConfig, ViTConfig
from vitkit.model.clip import CLIP, ZeroShotHead
from vitkit.model.text import TextTransformer
from vitkit.model.vit import ViT
from vitkit.rundir import TEXT_CONFIG_FILE, TEXT_WEIGHTS_FILE, TOKENIZER_FILE
from vitkit.weights import CheckpointError
from vitkit.weights.clip import from_open_clip, is_clip, load_clip, save_clip

TOL = 1e-5
TEXT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 12,
}
VISION = {
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 96,
    "image_size": 28,
    "patch_size": 7,
}


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            gain = any(n in name for n in ("norm", "ln_", "layrnorm")) and name.endswith("weight")
            p.copy_(1 + 0.3 * noise if gain else 0.1 * noise)
    return model.eval()


def _ids(vocab: int, eot: int, length: int = 12) -> torch.Tensor:
    """Three texts of different lengths: start token, random tokens, end-of-text, zeros."""
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(3, length, dtype=torch.long)
    for row, n in enumerate((1, 5, length - 2)):
        ids[row, 0] = eot - 1
        ids[row, 1 : n + 1] = torch.randint(1, eot - 1, (n,), generator=g)
        ids[row, n + 1] = eot
    return ids


def _images(size: int = 28) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


def _tiny_clip() -> CLIP:
    vision = ViTConfig(
        image_size=28, patch_size=7, width=48, depth=1, heads=3, num_classes=16, norm_pre=True
    )
    text = TextConfig(
        vocab_size=50, context_length=10, width=32, depth=1, heads=2, embed_dim=16, eot_id=49
    )
    return CLIP(ViT(vision), TextTransformer(text)).eval()


# -- Hugging Face -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("eos", [99, 2])  # 2: older configs, pooled at the largest id
def test_hf_clip_model_both_towers_match(transformers, tmp_path, eos):
    text = TEXT | {"eos_token_id": eos, "bos_token_id": 98, "pad_token_id": 0}
    config = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)
    ref = _randomise(transformers.CLIPModel(config))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / TOKENIZER_FILE).write_text("{}")  # read by data/text.py, not here
    assert is_clip(tmp_path)
    clip, tokenizer = load_clip(tmp_path)
    assert tokenizer == tmp_path / TOKENIZER_FILE
    ids, x = _ids(100, 99), _images()
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=x)
        _close(clip.encode_text(ids), out.text_embeds)
        _close(clip.encode_image(x), out.image_embeds)
        _close(clip(x, ids), out.logits_per_image)


# -- OpenCLIP -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_clip():
    declare_torchvision_ops()
    return pytest.importorskip("open_clip")


def _open_clip_dir(open_clip, directory, quick_gelu: bool, ls_init_value=None):
    vision = {"image_size": 28, "layers": 2, "width": 64, "patch_size": 7, "head_width": 32}
    if ls_init_value is not None:
        vision["ls_init_value"] = ls_init_value
    text = {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2}
    cfg = {"embed_dim": 24, "vision_cfg": vision, "text_cfg": text, "quick_gelu": quick_gelu}
    ref = open_clip.CLIP(
        **{k: v for k, v in cfg.items() if k != "quick_gelu"}, quick_gelu=quick_gelu
    )
    ref = _randomise(ref)
    directory.mkdir()
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()},
        directory / "open_clip_model.safetensors",
    )
    preprocess = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    data = {"model_cfg": cfg, "preprocess_cfg": preprocess}
    (directory / "open_clip_config.json").write_text(json.dumps(data))
    return ref


@pytest.mark.parametrize(("quick_gelu", "ls"), [(True, None), (False, 0.1)])
def test_open_clip_both_towers_match(open_clip, tmp_path, quick_gelu, ls):
    ref = _open_clip_dir(open_clip, tmp_path / "oc", quick_gelu, ls)
    clip = from_open_clip(tmp_path / "oc")
    assert clip.visual.config.mean == (0.4, 0.5, 0.6)
    assert clip.visual.config.act == ("quick_gelu" if quick_gelu else "gelu")
    ids, x = _ids(100, 99), _images()
    with torch.no_grad():
        _close(clip.encode_text(ids), ref.encode_text(ids, normalize=True))
        _close(clip.encode_image(x), ref.encode_image(x, normalize=True))
        image, text, scale = ref(x, ids)
        _close(clip(x, ids), scale * image @ text.T)


def test_open_clip_settings_vitkit_does_not_build_are_named(open_clip, tmp_path):
    _open_clip_dir(open_clip, tmp_path / "oc", True)
    path = tmp_path / "oc" / "open_clip_config.json"
    data = json.loads(path.read_text())
    data["model_cfg"]["vision_cfg"]["attentional_pool"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="attentional_pool"):
        from_open_clip(tmp_path / "oc")


# -- vitkit's own -------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    clip = _tiny_clip()
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)
    save_clip(clip, tmp_path / "m", '{"tokenizer": true}')
    loaded, tokenizer = load_clip(tmp_path / "m")
    assert tokenizer.read_text() == '{"tokenizer": true}'
    ids, x = _ids(50, 49, 10), _images()
    with torch.no_grad():
        _close(loaded(x, ids), clip(x, ids))
    assert loaded.logit_scale.item() == 3.0


def test_image_commands_read_a_clip_directory_as_its_image_tower(tmp_path):
    from vitkit.weights import load_model

    clip = _tiny_clip()
    save_clip(clip, tmp_path / "m", "{}")
    tower = load_model(tmp_path / "m")
    with torch.no_grad():
        _close(tower(_images()), clip.visual(_images()))


def test_text_padding_after_the_end_changes_nothing():
    text = _tiny_clip().text
    ids = _ids(50, 49, 10)
    padded = ids.clone()
    padded[padded == 0] = 7  # anything after end-of-text
    padded[:, 0] = ids[:, 0]
    with torch.no_grad():
        _close(text(ids), text(padded))


def test_zero_shot_head_is_clip_logits_per_label():
    clip = _tiny_clip()
    ids, x = _ids(50, 49, 10), _images()
    with torch.no_grad():
        classes = clip.encode_text(ids)
        head = ZeroShotHead(clip.visual.head, classes, clip.scale.item())
        tower = clip.visual
        logits = head(tower.forward_head(tower.forward_features(x), pre_logits=True))
        _close(logits, clip(x, ids))


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        (TEXT_CONFIG_FILE, '{"width": 33}', "not divisible by heads"),
        (TEXT_CONFIG_FILE, '{"vocab_size": 10000000000}', "vocab_size"),
        (TEXT_CONFIG_FILE, "[1, 2", "not valid JSON"),
        (TEXT_WEIGHTS_FILE, "garbage", "not a readable safetensors"),
    ],
)
def test_bad_text_files_are_refused_by_name(tmp_path, name, content, match):
    save_clip(_tiny_clip(), tmp_path / "m", "{}")
    (tmp_path / "m" / name).write_text(content)
    with pytest.raises(CheckpointError, match=match) as e:
        load_clip(tmp_path / "m")
    assert str(tmp_path / "m") in str(e.value) and "\n" not in str(e.value)


def test_text_weights_of_another_shape_are_named(tmp_path):
    save_clip(_tiny_clip(), tmp_path / "m", "{}")
    config = json.loads((tmp_path / "m" / TEXT_CONFIG_FILE).read_text())
    (tmp_path / "m" / TEXT_CONFIG_FILE).write_text(json.dumps(config | {"width": 64}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_clip(tmp_path / "m")


def test_a_plain_vit_is_not_a_clip(tmp_path):
    from vitkit.weights import save_model

    save_model(ViT(ViTConfig(image_size=28, patch_size=7, width=48, depth=1, heads=3)), tmp_path)
    assert not is_clip(tmp_path)
    with pytest.raises(CheckpointError, match="zero-shot needs a text tower"):
        load_clip(tmp_path)


def test_towers_of_different_spaces_are_refused():
    vision = ViTConfig(image_size=28, patch_size=7, width=48, depth=1, heads=3, num_classes=8)
    text = TextConfig(vocab_size=50, width=32, depth=1, heads=2, embed_dim=16, eot_id=49)
    with pytest.raises(ValueError, match="share one space"):
        CLIP(ViT(vision), TextTransformer(text))


def test_normalised_embeddings():
    clip = _tiny_clip()
    with torch.no_grad():
        e = clip.encode_text(_ids(50, 49, 10))
    _close(e.norm(dim=-1), torch.ones(3))
    _close(F.normalize(e, dim=-1), e)
