"""Google's `.npz` ViT checkpoints (vision_transformer a.k.a. vit_jax, and big_vision) -> vitkit.

JAX stores dense kernels as (in, out), convolution kernels as HWIO and attention projections
split per head; the table below names each tensor and how it is reshaped. Arrays are read with
`allow_pickle=False`: an .npz cannot run code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
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
        arrays = _open(path)
        config = _config(arrays)
        state = _state(arrays, config)
        problems = shape_problems({k: v.shape for k, v in state.items()}, state_shapes(config))
        if problems:
            raise CheckpointError(f"{path} does not fit one ViT: " + " | ".join(problems))
        model = ViT(config)
        model.load_state_dict(state)
        return model.eval()


@dataclass(frozen=True)
class _Arrays:
    """A checkpoint's arrays and the naming of the codebase that wrote them."""

    path: Path
    arrays: dict[str, np.ndarray]
    prefix: str  # where the model's parameters live within the file
    big_vision: bool

    def has(self, name: str) -> bool:
        return self.prefix + name in self.arrays

    def get(self, name: str) -> np.ndarray:
        """The float array `name` (a CheckpointError naming it if it is missing or not floats)."""
        key = self.prefix + name
        if key not in self.arrays:
            raise CheckpointError(f"{self.path}: missing {key}")
        array = self.arrays[key]
        if array.dtype.kind != "f":  # weights only: optimiser state may hold integers
            raise CheckpointError(f"{self.path}: {key} holds {array.dtype}, not floats")
        return array

    @property
    def block_modules(self) -> tuple[int, int, int]:
        """(attention, MLP, second LayerNorm) sub-module indices inside an encoder block."""
        return BIG_VISION_BLOCK if self.big_vision else VIT_JAX_BLOCK

    @property
    def pos_embedding(self) -> str:
        return "pos_embedding" if self.big_vision else "Transformer/posembed_input/pos_embedding"

    def blocks(self) -> list[int]:
        """The encoder blocks' indices, as the arrays' names give them."""
        pattern = rf"{re.escape(self.prefix)}Transformer/encoderblock_(\d+)/"
        return sorted({int(m.group(1)) for k in self.arrays if (m := re.match(pattern, k))})


def _open(path: Path) -> _Arrays:
    """Every array of the file, and which codebase's names they have."""
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
    return _Arrays(path, w, prefix, big_vision)


def _config(w: _Arrays) -> ViTConfig:
    """The architecture, read from the arrays' names and shapes."""
    patch, _, channels, width = w.get("embedding/kernel").shape  # (p, p, C, D)
    resnet = _resnet_config(w.arrays, w.prefix)
    if resnet:
        channels = w.arrays[f"{w.prefix}conv_root/kernel"].shape[2]
    mha, mlp, _ = w.block_modules
    # (D, heads, head_dim)
    query = w.get(f"Transformer/encoderblock_0/MultiHeadDotProductAttention_{mha}/query/kernel")
    class_token = w.has("cls")
    positions = w.get(w.pos_embedding).reshape(-1, width).shape[0]
    grid = grid_of(positions - 1) if class_token else grid_of(positions)
    if grid is None:
        raise CheckpointError(f"{w.path}: {positions} position embeddings are not a square grid")
    hidden = w.get(f"Transformer/encoderblock_0/MlpBlock_{mlp}/Dense_0/kernel").shape[1]
    stride = patch * resnet_stride(resnet.get("resnet_layers"), resnet.get("resnet_stem", ""))
    return ViTConfig(
        image_size=grid * stride,
        patch_size=patch,
        in_channels=channels,
        num_classes=w.arrays[f"{w.prefix}head/kernel"].shape[1] if w.has("head/kernel") else 0,
        width=width,
        depth=len(w.blocks()),
        heads=query.shape[1],
        mlp_ratio=hidden / width,
        pool="cls" if class_token else "mean",
        class_token=class_token,
        mean=(0.5,) * channels,  # Google's checkpoints take inputs scaled to [-1, 1]
        std=(0.5,) * channels,
        interpolation="bilinear",  # tf.image.resize's default in vit_jax and big_vision
        **resnet,
    )


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _state(w: _Arrays, config: ViTConfig) -> dict[str, torch.Tensor]:
    """vitkit's state dict from the arrays: JAX layouts transposed to PyTorch's."""
    width = config.width
    state = {
        "patch_embed.proj.weight": _tensor(w.get("embedding/kernel").transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _tensor(w.get("embedding/bias")),
        "pos_embed": _tensor(w.get(w.pos_embedding).reshape(1, -1, width)),
        "norm.weight": _tensor(w.get("Transformer/encoder_norm/scale")),
        "norm.bias": _tensor(w.get("Transformer/encoder_norm/bias")),
    }
    if config.class_token:
        state["cls_token"] = _tensor(w.get("cls").reshape(1, 1, width))
    if w.has("head/kernel"):
        state["head.weight"] = _tensor(w.get("head/kernel").T)
        state["head.bias"] = _tensor(w.get("head/bias"))
    for i in w.blocks():
        state |= _block_state(w, i, width)
    if config.resnet_layers is not None:
        state |= _resnet_state(w.get, config.resnet_layers)
    return state


def _block_state(w: _Arrays, i: int, width: int) -> dict[str, torch.Tensor]:
    """Encoder block `i`'s tensors, named as vitkit names them."""
    mha, mlp, ln2 = w.block_modules
    b, ours = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    a = f"{b}MultiHeadDotProductAttention_{mha}/"
    qkv = ("query", "key", "value")
    return {
        ours + "norm1.weight": _tensor(w.get(f"{b}LayerNorm_0/scale")),
        ours + "norm1.bias": _tensor(w.get(f"{b}LayerNorm_0/bias")),
        # query/key/value kernels are (D, heads, head_dim): (D, D).T each, stacked.
        ours + "attn.qkv.weight": _tensor(
            np.concatenate([w.get(f"{a}{n}/kernel").reshape(width, width).T for n in qkv])
        ),
        ours + "attn.qkv.bias": _tensor(
            np.concatenate([w.get(f"{a}{n}/bias").reshape(-1) for n in qkv])
        ),
        # out kernel is (heads, head_dim, D).
        ours + "attn.proj.weight": _tensor(w.get(f"{a}out/kernel").reshape(width, width).T),
        ours + "attn.proj.bias": _tensor(w.get(f"{a}out/bias")),
        ours + "norm2.weight": _tensor(w.get(f"{b}LayerNorm_{ln2}/scale")),
        ours + "norm2.bias": _tensor(w.get(f"{b}LayerNorm_{ln2}/bias")),
        ours + "mlp.fc1.weight": _tensor(w.get(f"{b}MlpBlock_{mlp}/Dense_0/kernel").T),
        ours + "mlp.fc1.bias": _tensor(w.get(f"{b}MlpBlock_{mlp}/Dense_0/bias")),
        ours + "mlp.fc2.weight": _tensor(w.get(f"{b}MlpBlock_{mlp}/Dense_1/kernel").T),
        ours + "mlp.fc2.bias": _tensor(w.get(f"{b}MlpBlock_{mlp}/Dense_1/bias")),
    }


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


def _resnet_state(
    get: Callable[[str], np.ndarray], layers: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """The ResNet's weights: HWIO kernels to OIHW, GroupNorm scale/bias to weight/bias."""

    def convert(jax: str, ours: str) -> dict[str, torch.Tensor]:
        ours = f"patch_embed.backbone.{ours}"
        if jax.rsplit("/", 1)[-1].startswith("conv"):
            return {f"{ours}.weight": _tensor(get(f"{jax}/kernel").transpose(3, 2, 0, 1))}
        return {
            f"{ours}.weight": _tensor(get(f"{jax}/scale").reshape(-1)),
            f"{ours}.bias": _tensor(get(f"{jax}/bias").reshape(-1)),
        }

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
