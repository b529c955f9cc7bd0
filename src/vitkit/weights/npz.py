"""Google's `.npz` ViT checkpoints (vision_transformer a.k.a. vit_jax, and big_vision) -> vitkit.

JAX stores dense kernels as (in, out), convolution kernels as HWIO and attention projections
split per head; the table below names each tensor and how it is reshaped. Arrays are read with
`allow_pickle=False`: an .npz cannot run code.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from vitkit.config import ViTConfig, resnet_stride
from vitkit.model.vit import ViT, state_shapes
from vitkit.weights.foreign import check_unpacked_size, grid_of
from vitkit.weights.format import CheckpointError, reading, shape_problems

# Sub-module indices inside an encoder block differ between the two codebases:
# (attention, MLP, second LayerNorm).
VIT_JAX_BLOCK = (1, 3, 2)
BIG_VISION_BLOCK = (0, 0, 1)
PREFIXES = ("", "opt/target/", "params/")
# The hybrid's ResNet-v2 (vit_jax names -> timm/vitkit names under patch_embed.backbone.).
RESNET_STEM = {"conv_root": "stem.conv", "gn_root": "stem.norm"}
# Within unit j of block s: "block{s+1}/unit{j+1}/<jax>" -> "stages.{s}.blocks.{j}.<vitkit>".
RESNET_UNIT = {
    "conv1": "conv1",
    "gn1": "norm1",
    "conv2": "conv2",
    "gn2": "norm2",
    "conv3": "conv3",
    "gn3": "norm3",
    "conv_proj": "downsample.conv",
    "gn_proj": "downsample.norm",
}


def from_npz(path: str | Path) -> ViT:
    """A vitkit model with the weights and architecture of a Google .npz checkpoint."""
    path = Path(path)
    with reading(path):
        return _from_npz(path)


def _from_npz(path: Path) -> ViT:
    check_unpacked_size(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            w = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file: {e}") from None
    prefix = next((p for p in PREFIXES if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise CheckpointError(f"{path}: no embedding/kernel: not a ViT .npz checkpoint")
    for unsupported in ("pre_logits/kernel", "MAPHead_0/probe"):
        if prefix + unsupported in w:
            raise CheckpointError(f"{path}: {unsupported.split('/')[0]} is not supported")
    big_vision = prefix == "params/" or f"{prefix}pos_embedding" in w
    mha, mlp, ln2 = BIG_VISION_BLOCK if big_vision else VIT_JAX_BLOCK
    pos_key = (
        f"{prefix}pos_embedding"
        if big_vision
        else (f"{prefix}Transformer/posembed_input/pos_embedding")
    )

    def get(name: str) -> np.ndarray:
        if prefix + name not in w:
            raise CheckpointError(f"{path}: missing {prefix + name}")
        array = w[prefix + name]
        if array.dtype.kind != "f":  # weights only: optimiser state may hold integers
            raise CheckpointError(f"{path}: {prefix + name} holds {array.dtype}, not floats")
        return array

    kernel = get("embedding/kernel")  # (p, p, C, D)
    patch, _, channels, width = kernel.shape
    resnet = _resnet_config(w, prefix)
    if resnet:
        channels = w[f"{prefix}conv_root/kernel"].shape[2]
    blocks = sorted(
        {
            int(m.group(1))
            for k in w
            if (m := re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k))
        }
    )
    attn = f"Transformer/encoderblock_0/MultiHeadDotProductAttention_{mha}"
    heads = get(f"{attn}/query/kernel").shape[1]
    class_token = f"{prefix}cls" in w
    positions = get(pos_key.removeprefix(prefix)).reshape(-1, width).shape[0]
    grid = grid_of(positions - 1) if class_token else grid_of(positions)
    if grid is None:
        raise CheckpointError(f"{path}: {positions} position embeddings are not a square grid")
    head = f"{prefix}head/kernel" in w
    stride = patch * resnet_stride(resnet.get("resnet_layers"), resnet.get("resnet_stem", ""))
    config = ViTConfig(
        image_size=grid * stride,
        patch_size=patch,
        in_channels=channels,
        num_classes=w[f"{prefix}head/kernel"].shape[1] if head else 0,
        width=width,
        depth=len(blocks),
        heads=heads,
        mlp_ratio=get(f"Transformer/encoderblock_0/MlpBlock_{mlp}/Dense_0/kernel").shape[1] / width,
        pool="cls" if class_token else "mean",
        class_token=class_token,
        mean=(0.5,) * channels,  # Google's checkpoints take inputs scaled to [-1, 1]
        std=(0.5,) * channels,
        interpolation="bilinear",  # tf.image.resize's default in vit_jax and big_vision
        **resnet,
    )

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    state = {
        "patch_embed.proj.weight": t(kernel.transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": t(get("embedding/bias")),
        "pos_embed": t(get(pos_key.removeprefix(prefix)).reshape(1, -1, width)),
        "norm.weight": t(get("Transformer/encoder_norm/scale")),
        "norm.bias": t(get("Transformer/encoder_norm/bias")),
    }
    if class_token:
        state["cls_token"] = t(get("cls").reshape(1, 1, width))
    if head:
        state["head.weight"] = t(get("head/kernel").T)
        state["head.bias"] = t(get("head/bias"))
    for i in blocks:
        b, ours = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        a = f"{b}MultiHeadDotProductAttention_{mha}/"
        state |= {
            ours + "norm1.weight": t(get(f"{b}LayerNorm_0/scale")),
            ours + "norm1.bias": t(get(f"{b}LayerNorm_0/bias")),
            # query/key/value kernels are (D, heads, head_dim): (D, D).T each, stacked.
            ours + "attn.qkv.weight": t(
                np.concatenate(
                    [
                        get(f"{a}{n}/kernel").reshape(width, width).T
                        for n in ("query", "key", "value")
                    ]
                )
            ),
            ours + "attn.qkv.bias": t(
                np.concatenate([get(f"{a}{n}/bias").reshape(-1) for n in ("query", "key", "value")])
            ),
            # out kernel is (heads, head_dim, D).
            ours + "attn.proj.weight": t(get(f"{a}out/kernel").reshape(width, width).T),
            ours + "attn.proj.bias": t(get(f"{a}out/bias")),
            ours + "norm2.weight": t(get(f"{b}LayerNorm_{ln2}/scale")),
            ours + "norm2.bias": t(get(f"{b}LayerNorm_{ln2}/bias")),
            ours + "mlp.fc1.weight": t(get(f"{b}MlpBlock_{mlp}/Dense_0/kernel").T),
            ours + "mlp.fc1.bias": t(get(f"{b}MlpBlock_{mlp}/Dense_0/bias")),
            ours + "mlp.fc2.weight": t(get(f"{b}MlpBlock_{mlp}/Dense_1/kernel").T),
            ours + "mlp.fc2.bias": t(get(f"{b}MlpBlock_{mlp}/Dense_1/bias")),
        }
    if resnet:
        state |= _resnet_state(get, resnet["resnet_layers"])
    problems = shape_problems({k: v.shape for k, v in state.items()}, state_shapes(config))
    if problems:
        raise CheckpointError(f"{path} does not fit one ViT: " + " | ".join(problems))
    model = ViT(config)
    model.load_state_dict(state)
    return model.eval()


def _resnet_config(w: dict[str, np.ndarray], prefix: str) -> dict:
    """The hybrid's ResNet settings (empty for a plain ViT) from the tensors' names and shapes."""
    root = w.get(f"{prefix}conv_root/kernel")  # (k, k, C, width)
    if root is None:
        return {}
    units: dict[int, int] = {}
    for k in w:
        if m := re.fullmatch(rf"{re.escape(prefix)}block(\d+)/unit(\d+)/conv1/kernel", k):
            units[int(m[1])] = units.get(int(m[1]), 0) + 1
    return {
        "resnet_layers": tuple(units[b] for b in sorted(units)),
        "resnet_width": root.shape[3],
        "resnet_stem": "imagenet" if root.shape[0] == 7 else "small",
    }


def _resnet_state(get, layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The ResNet's weights: HWIO kernels to OIHW, GroupNorm scale/bias to weight/bias."""

    def convert(jax: str, ours: str) -> dict[str, torch.Tensor]:
        out = {}
        if jax.rsplit("/", 1)[-1].startswith("conv"):
            kernel = get(f"{jax}/kernel").transpose(3, 2, 0, 1)
            out[f"patch_embed.backbone.{ours}.weight"] = torch.from_numpy(
                np.ascontiguousarray(kernel, dtype=np.float32)
            )
        else:
            for jax_name, part in (("scale", "weight"), ("bias", "bias")):
                value = get(f"{jax}/{jax_name}").reshape(-1).astype(np.float32)
                out[f"patch_embed.backbone.{ours}.{part}"] = torch.from_numpy(value)
        return out

    state: dict[str, torch.Tensor] = {}
    for jax, ours in RESNET_STEM.items():
        state |= convert(jax, ours)
    for s, depth in enumerate(layers):
        for j in range(depth):
            for jax, ours in RESNET_UNIT.items():
                if j > 0 and "proj" in jax:
                    continue  # only a stage's first unit projects its shortcut
                state |= convert(f"block{s + 1}/unit{j + 1}/{jax}", f"stages.{s}.blocks.{j}.{ours}")
    return state
