"""Pretrained weights from timm and Hugging Face: same architecture read back, same logits."""

import json
import os
import pickle
import re

import pytest
import torch

from vitkit import CheckpointError, create_model, load_model, load_pretrained
from vitkit.cli import main
from vitkit.weights.foreign import read_state_dict
from vitkit.weights.hf import from_hf, to_hf
from vitkit.weights.timm import from_timm, to_timm


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Max abs difference <= 1e-5, relative to the logits' scale when they are large."""
    scale = max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= 1e-5 * scale


# (timm name, image size, heads to state: weights alone cannot tell 16 heads of 48 from 12 of 64)
# Base-sized models take seconds each: in the full suite only.
_SLOW = pytest.mark.slow
TIMM_MODELS = [
    ("vit_tiny_patch16_224", 224, None),
    ("vit_small_patch16_224", 224, None),
    pytest.param("vit_base_patch16_224", 224, None, marks=_SLOW),
    pytest.param("vit_base_patch32_224", 224, None, marks=_SLOW),
    ("vit_tiny_patch16_384", 384, None),
    pytest.param("vit_base_patch16_gap_224", 224, 16, marks=_SLOW),  # no [CLS], mean pooling
    # 4 registers, fc_norm after pooling
    pytest.param("vit_base_patch16_reg4_gap_256", 256, None, marks=_SLOW),
    # the paper's hybrid: ResNet-50 stages (3, 4, 9)
    pytest.param("vit_base_r50_s16_384", 384, None, marks=_SLOW),
    pytest.param("vit_small_r26_s32_224", 224, None, marks=_SLOW),  # ResNet-26 (2, 2, 2, 2)
]


@pytest.mark.parametrize(("name", "size", "heads"), TIMM_MODELS)
def test_timm_parity(timm, name, size, heads):
    ref = timm.create_model(name, pretrained=False, num_classes=10).eval()
    torch.nn.init.normal_(ref.head.weight, std=0.05)  # timm zero-initialises some heads
    model = from_timm(ref.state_dict(), heads=heads)
    c = model.config
    assert (c.image_size, c.num_classes, c.depth) == (size, 10, len(ref.blocks))
    assert c.heads == ref.blocks[0].attn.num_heads
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert_logits_close(model(x), ref(x))
        state = to_timm(model)
    ref.load_state_dict(state)  # and back: timm takes vitkit's weights as they are


def test_timm_imagenet_checkpoint_gets_class_names_and_bicubic(timm, tmp_path):
    from safetensors.torch import save_file

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    save_file(ref.state_dict(), tmp_path / "in1k.safetensors")
    model = load_pretrained(tmp_path / "in1k.safetensors")
    assert model.config.num_classes == 1000 and model.config.interpolation == "bicubic"
    assert model.labels[0] == "tench, Tinca tinca" and model.labels[999].startswith("toilet tissue")
    assert model.labels[285] == "Egyptian cat" and len(set(model.labels)) == 999  # two cranes


def test_timm_file_formats(timm, tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5).eval()
    torch.nn.init.normal_(ref.head.weight, std=0.05)
    x = torch.randn(1, 3, 224, 224)
    from safetensors.torch import save_file

    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "w.pth")
    with torch.no_grad():
        for f in ("w.safetensors", "w.pth"):
            assert_logits_close(from_timm(tmp_path / f)(x), ref(x))


def _hf_model(transformers, tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=64,
        patch_size=16,
        num_labels=4,
        **kw,
    )
    ref = transformers.ViTForImageClassification(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    return ref


@pytest.mark.slow
def test_hugging_face_parity_and_round_trip(transformers, tmp_path):
    ref = _hf_model(transformers, tmp_path)  # default layer_norm_eps 1e-12, read from config.json
    model = from_hf(tmp_path / "hf")
    assert model.config.ln_eps == 1e-12 and model.labels == [f"LABEL_{i}" for i in range(4)]
    assert model.config.interpolation == "bilinear"  # ViTImageProcessor's default
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_logits_close(model(x), ref(pixel_values=x).logits)
    # vitkit -> Hugging Face -> vitkit
    mine = create_model("Ti/16", image_size=64, num_classes=3, depth=2, seed=1)
    torch.nn.init.normal_(mine.head.weight, std=0.05)
    mine.labels = ["cat", "dog", "eel"]
    mine.config = mine.config.replace(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    to_hf(mine.eval(), tmp_path / "out")
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.resample == 3 and list(processor.image_mean) == [0.4, 0.5, 0.6]  # bicubic
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert theirs.config.id2label[2] == "eel"
    back = from_hf(tmp_path / "out")
    with torch.no_grad():
        assert_logits_close(theirs(pixel_values=x).logits, mine(x))
    a, b = mine.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and back.labels == mine.labels
    assert back.config == mine.config


def test_hugging_face_backbone_without_head(transformers, tmp_path):
    cfg = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    ref = transformers.ViTModel(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf")
    assert model.config.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(x), ref(pixel_values=x).last_hidden_state, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    "overrides",
    [
        {"pool": "mean", "class_token": False},
        {"num_registers": 2},
        {"resnet_layers": (1,), "patch_size": 4},
        {"mlp": "swiglu"},
    ],
)
def test_models_hugging_face_cannot_express_are_refused(tmp_path, overrides):
    model = create_model("Ti/16", depth=1, **overrides)
    with pytest.raises(CheckpointError, match="cannot be exported"):
        to_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['VITKIT_PAYLOAD_MARK']}",))


def test_pickle_payload_refused_and_not_run(tmp_path, monkeypatch):
    mark = tmp_path / "ran"
    monkeypatch.setenv("VITKIT_PAYLOAD_MARK", str(mark))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload()}, f)
    torch.save({"w": torch.zeros(1), "x": _Payload()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refused|not a readable"):
            read_state_dict(p)
    assert not mark.exists()


def test_bad_checkpoints_named(timm, tmp_path):
    from safetensors.torch import save_file

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True)
    save_file(ref.state_dict(), tmp_path / "qk.safetensors")
    with pytest.raises(CheckpointError, match=r"qk_norm\): unsupported tensors .*q_norm"):
        from_timm(tmp_path / "qk.safetensors")
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file(plain.state_dict(), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        from_timm(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        from_timm(tmp_path / "missing.safetensors")


def test_cli_convert(timm, transformers, tmp_path, capsys):
    from safetensors.torch import save_file

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3).eval()
    save_file(ref.state_dict(), tmp_path / "t.safetensors")
    assert main(["convert", str(tmp_path / "t.safetensors"), str(tmp_path / "m")]) == 0
    model = load_model(tmp_path / "m")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_logits_close(model(x), ref(x))
    _hf_model(transformers, tmp_path)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m2")]) == 0
    assert json.loads((tmp_path / "m2/config.json").read_text())["ln_eps"] == 1e-12
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    assert (tmp_path / "hf2/preprocessor_config.json").is_file()
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "m3")]) == 2
    assert "not a model directory" in capsys.readouterr().err


def _write_google_npz(ref, path, big_vision: bool) -> None:
    """Write `ref` (a timm ViT) as a Google .npz: JAX layouts, per-head attention kernels."""
    import numpy as np

    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    d, heads = ref.embed_dim, ref.blocks[0].attn.num_heads
    p = "params/" if big_vision else ""
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    pos = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
    w = {
        p + "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        p + "embedding/bias": sd["patch_embed.proj.bias"],
        p + "cls": sd["cls_token"],
        p + pos: sd["pos_embed"],
        p + "Transformer/encoder_norm/scale": sd["norm.weight"],
        p + "Transformer/encoder_norm/bias": sd["norm.bias"],
        p + "head/kernel": sd["head.weight"].T,
        p + "head/bias": sd["head.bias"],
    }
    for i in range(len(ref.blocks)):
        b, t = f"{p}Transformer/encoderblock_{i}/", f"blocks.{i}."
        a = f"{b}MultiHeadDotProductAttention_{mha}/"
        qkv_w = np.split(sd[t + "attn.qkv.weight"], 3)
        qkv_b = np.split(sd[t + "attn.qkv.bias"], 3)
        for n, wt, bias in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            w[f"{a}{n}/kernel"] = wt.T.reshape(d, heads, d // heads)
            w[f"{a}{n}/bias"] = bias.reshape(heads, d // heads)
        w[f"{a}out/kernel"] = sd[t + "attn.proj.weight"].T.reshape(heads, d // heads, d)
        w[f"{a}out/bias"] = sd[t + "attn.proj.bias"]
        for ln, ours in ((0, "norm1"), (ln2, "norm2")):
            w[f"{b}LayerNorm_{ln}/scale"] = sd[t + ours + ".weight"]
            w[f"{b}LayerNorm_{ln}/bias"] = sd[t + ours + ".bias"]
        for k, fc in ((0, "fc1"), (1, "fc2")):
            w[f"{b}MlpBlock_{mlp}/Dense_{k}/kernel"] = sd[f"{t}mlp.{fc}.weight"].T
            w[f"{b}MlpBlock_{mlp}/Dense_{k}/bias"] = sd[f"{t}mlp.{fc}.bias"]
    # The hybrid's ResNet, named as in vit_jax: conv_root, gn_root, block{s}/unit{j}/...
    jax = {"stem.conv": "conv_root", "stem.norm": "gn_root", "downsample.conv": "conv_proj"}
    jax |= {"downsample.norm": "gn_proj"} | {f"norm{n}": f"gn{n}" for n in (1, 2, 3)}
    for k, v in sd.items():
        if not k.startswith("patch_embed.backbone."):
            continue
        name, part = k.removeprefix("patch_embed.backbone.").rsplit(".", 1)
        if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", name):
            unit = f"block{int(m[1]) + 1}/unit{int(m[2]) + 1}/"
            name = unit + jax.get(m[3], m[3])
        else:
            name = jax[name]
        if v.ndim == 4:
            w[f"{p}{name}/kernel"] = v.transpose(2, 3, 1, 0)
        else:
            w[f"{p}{name}/{'scale' if part == 'weight' else 'bias'}"] = v
    np.savez(path, **w)


@pytest.mark.slow
@pytest.mark.parametrize("big_vision", [False, True])
def test_google_npz_parity_with_timms_loader(timm, tmp_path, big_vision):
    from timm.models.vision_transformer import _load_weights

    src = timm.create_model("vit_small_patch16_224", pretrained=False, depth=3, num_classes=7)
    torch.nn.init.normal_(src.head.weight, std=0.05)
    _write_google_npz(src, tmp_path / "g.npz", big_vision)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, depth=3, num_classes=7)
    _load_weights(ref, str(tmp_path / "g.npz"))
    assert main(["convert", str(tmp_path / "g.npz"), str(tmp_path / "m")]) == 0
    model = load_model(tmp_path / "m")
    assert (model.config.heads, model.config.depth, model.config.mean) == (6, 3, (0.5,) * 3)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_logits_close(model(x), ref.eval()(x))
        assert_logits_close(model(x), src.eval()(x))


@pytest.mark.slow
def test_google_npz_hybrid_parity_with_timms_loader(timm, tmp_path):
    from timm.models.vision_transformer import _load_weights

    name, kw = "vit_base_r50_s16_384", {"depth": 2, "num_classes": 5}
    src = timm.create_model(name, pretrained=False, **kw)
    torch.nn.init.normal_(src.head.weight, std=0.05)
    for m in src.modules():  # timm zero-initialises each block's last norm
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.1)
    _write_google_npz(src, tmp_path / "r50.npz", big_vision=False)
    ref = timm.create_model(name, pretrained=False, **kw)
    _load_weights(ref, str(tmp_path / "r50.npz"))
    model = load_pretrained(tmp_path / "r50.npz")
    c = model.config
    assert (c.resnet_layers, c.resnet_width, c.image_size, c.grid_size) == ((3, 4, 9), 64, 384, 24)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert_logits_close(model(x), ref.eval()(x))
        assert_logits_close(model(x), src.eval()(x))


@pytest.mark.slow
def test_hub_names_offline_give_the_local_alternative(monkeypatch):
    from vitkit.weights import load_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-vitkit-cache")
    with pytest.raises(CheckpointError, match="cannot download.*local Hugging Face directory"):
        load_pretrained("hf:google/vit-base-patch16-224")
    with pytest.raises(CheckpointError, match="cannot download.*local timm weights file"):
        load_pretrained("timm:vit_small_patch16_224.augreg_in21k_ft_in1k")
