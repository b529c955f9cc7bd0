"""The Transformer encoder: pre-norm blocks of multi-head self-attention and an MLP."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.config import TextConfig, ViTConfig


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    The default path calls the fused `scaled_dot_product_attention` kernel, which never forms
    the attention matrix; `need_weights=True` computes it explicitly (same maths) for
    explanation, as does bf16 on a CPU, where that is faster (`explicit_attention`).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.heads = heads
        # Causal (CLIP's text tower): token i attends to tokens 0..i only.
        self.causal = causal
        self.head_dim = width // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(dropout)
        # None: the inputs' dtype. `optimize` sets bf16 inside int8 models, whose attention
        # matmuls stay unquantised (softmax inputs are too sensitive for int8).
        self.compute_dtype: torch.dtype | None = None

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dtype = qkv.dtype
        q, k, v = qkv.to(self.compute_dtype or dtype).unbind(0)  # each (B, heads, T, head_dim)
        weights = None
        if need_weights or explicit_attention(q):
            scores = q * self.scale @ k.transpose(-2, -1)
            if self.causal:
                future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            weights = scores.softmax(dim=-1)
            p = F.dropout(weights, self.attn_dropout, self.training)
            x = p @ v
            weights = weights if need_weights else None
        else:
            p = self.attn_dropout if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        x = x.transpose(1, 2).reshape(b, t, d).to(dtype)
        return self.proj_drop(self.proj(x)), weights


def explicit_attention(q: torch.Tensor) -> bool:
    """Whether plain matmuls + softmax beat the fused kernel for these queries.

    Measured on 2-core CPUs at 197 tokens: with AVX-512-bf16 the fused kernel runs bf16 at
    fp32 speed (2.3x slower than bf16 matmuls); with AMX it multiplies on the bf16 tiles and
    is 2.4x faster than the matmuls, but its backward is still 1.9x slower (and took 40% of
    a small model's training step), so only inference takes it there. In fp32, and on GPUs,
    the fused kernel wins.
    """
    if q.dtype != torch.bfloat16 or q.device.type != "cpu":
        return False
    return q.requires_grad or not amx_tiles()


@functools.cache
def amx_tiles() -> bool:
    """Whether this CPU has AMX tiles (and PyTorch's fused attention uses them)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's cheap approximation of GELU, which its weights
    were trained with (exact GELU shifts their outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The MLP's nonlinearity named by `ViTConfig.act`."""
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwiGLU(nn.Module):
    """fc2(silu(gate) * value) (Shazeer, 2020; DINOv2's giant), `hidden` units wide.

    fc1 packs the gate's rows, then the value's, so that timm's SwiGLUPacked and the
    weights_in of DINOv2 (Meta's and transformers' files) load as they are.
    """

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.drop(self.fc2(self.drop(self.act(gate) * value)))


def block_mlp(config: ViTConfig | TextConfig) -> nn.Module:
    """A block's MLP: SwiGLU where a ViTConfig asks for one (text towers have none)."""
    c = config
    if isinstance(c, ViTConfig) and c.mlp == "swiglu":
        return SwiGLU(c.width, c.mlp_dim, c.dropout)
    return Mlp(c.width, c.mlp_dim, c.dropout, c.act)


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch, rescaling the survivors."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel gains on a residual branch (CaiT, DeiT-III, DINOv2). Started small, they
    keep a deep block close to the identity early in training."""

    def __init__(self, width: int, init: float) -> None:
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)): the pre-norm block of the paper (eq. 2-3).

    Its sizes and dropout rates are the config's; `drop_path` is this block's own rate
    (stochastic depth grows with depth, see `ViT`). With `layer_scale_init`, each branch is
    scaled by learnt per-channel gains (`ls1`, `ls2`) before it joins the residual stream.
    A text tower's blocks are `causal`.
    """

    def __init__(
        self, config: ViTConfig | TextConfig, drop_path: float, causal: bool = False
    ) -> None:
        super().__init__()
        c = config
        self.norm1 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.attn = Attention(
            c.width,
            c.heads,
            qkv_bias=c.qkv_bias,
            dropout=c.dropout,
            attn_dropout=c.attn_dropout,
            causal=causal,
        )
        self.norm2 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.mlp = block_mlp(c)
        init = c.layer_scale_init
        self.ls1 = LayerScale(c.width, init) if init is not None else nn.Identity()
        self.ls2 = LayerScale(c.width, init) if init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, weights


class AttentionPool(nn.Module):
    """Multi-head attention pooling (MAP; SigLIP): a learnt probe token attends over the
    tokens, then goes through a pre-norm MLP with a residual, as the second half of a block.

    Names follow timm's `attn_pool`: `latent` is the probe, `q` projects it, `kv` the tokens.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        c = config
        self.heads = c.heads
        self.latent = nn.Parameter(torch.zeros(1, 1, c.width))
        self.q = nn.Linear(c.width, c.width)
        self.kv = nn.Linear(c.width, 2 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.mlp = Mlp(c.width, c.mlp_dim, c.dropout, c.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, D) -> the pooled probe (B, D)."""
        b, t, d = x.shape
        q = self.q(self.latent).view(1, self.heads, 1, d // self.heads).expand(b, -1, -1, -1)
        kv = self.kv(x).view(b, t, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, heads, 1, head_dim)
        y = self.proj(y.transpose(1, 2).reshape(b, 1, d))
        return (y + self.mlp(self.norm(y)))[:, 0]
