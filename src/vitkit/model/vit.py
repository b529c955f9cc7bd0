"""The Vision Transformer (Dosovitskiy et al., 2021), top to bottom.

image (B, C, H, W)
  (-> hybrid only: ResNet-v2 feature map         resnet.py)
  -> patch embedding            (B, N, D)       patch_embed.py
  -> + position embeddings, prepend [CLS] (and DeiT's distillation token, registers)
     (CLIP: then a LayerNorm)
  -> depth x pre-norm block     (B, T, D)       encoder.py
  -> final LayerNorm -> pool ([CLS], mean, or attention) -> linear head -> logits (B, classes)
     (fc_norm models: pool, then LayerNorm; distilled: the mean of two heads' logits;
     SigLIP: a probe token attends over the patch tokens, then an MLP, `AttentionPool`)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.config import ViTConfig
from vitkit.model.encoder import AttentionPool, Block, LayerScale
from vitkit.model.patch_embed import PatchEmbed
from vitkit.model.resnet import resnet_macs


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.labels: list[str] | None = None
        # Sample training images (uint8) that int8 inference calibrates on; see optimize.py.
        self.calibration: torch.Tensor | None = None
        c = config
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width)) if c.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.width)) if c.distilled else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, c.num_registers, c.width)) if c.num_registers else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_pos_embeds, c.width))
        self.pos_drop = nn.Dropout(c.dropout)
        self.norm_pre = nn.LayerNorm(c.width, eps=c.ln_eps) if c.norm_pre else nn.Identity()
        # Stochastic depth grows linearly with depth, as in DeiT / timm.
        # (Computed on the CPU even when the model is built on the meta device, see `state_shapes`.)
        rates = torch.linspace(0, c.drop_path, c.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(c, r) for r in rates)
        self.norm = nn.Identity() if c.fc_norm else nn.LayerNorm(c.width, eps=c.ln_eps)
        self.attn_pool = AttentionPool(c) if c.pool == "map" else None
        self.fc_norm = nn.LayerNorm(c.width, eps=c.ln_eps) if c.fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(c.dropout)
        self.head = self._new_head()
        self.head_dist = self._new_head() if c.distilled else None
        # Training with a teacher: forward gives both heads' logits (see `forward_head`).
        self.distilling = False
        self.grad_checkpointing = False  # see `set_grad_checkpointing`
        # A model on the meta device has no values to initialise (and initialising them would
        # load torch's reference kernels, seconds the first time).
        if self.pos_embed.device.type != "meta":
            self.init_weights()

    def _new_head(self) -> nn.Module:
        """A zero head, so that training starts from uniform predictions (none: features)."""
        c = self.config
        if not c.num_classes:
            return nn.Identity()
        head = nn.Linear(c.width, c.num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated normal (std 0.02) for linear layers, position embeddings and the
        distillation token (as DeiT), LeCun normal for the patch projection, near-zero [CLS]
        and registers, layer-scale gains at their initial value, a unit-scale attention-pool
        probe (std 1/sqrt(width), as timm), and zero heads so that training starts from
        uniform predictions."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, m.init)
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / fan_in))
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.config.width**-0.5)
        for head in (self.head, self.head_dist):
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def input_spec(self) -> tuple[torch.device, torch.dtype]:
        """The device and dtype the model's inputs should have: those of its weights."""
        param = next(self.parameters())
        return param.device, param.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Training keeps only each block's input and recomputes the rest of its activations in
        the backward pass: far less memory for one more forward pass. Dropout and stochastic
        depth draw the same masks again (the RNG state is restored), so gradients are unchanged.
        """
        self.grad_checkpointing = enable

    # -- tokens ---------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, D): patch tokens with position embeddings, prefix tokens
        first: [CLS], the distillation token, registers."""
        stride = self.config.token_stride
        grid = (x.shape[-2] // stride, x.shape[-1] // stride)
        x = self.patch_embed(x)
        pos = self.pos_embed
        if grid != (self.config.grid_size,) * 2:  # any resolution: resample on the fly
            pos = resample_pos_embed(pos, grid, self.num_pos_prefix)
        x = x + pos[:, self.num_pos_prefix :]
        prefix = [t for t in (self.cls_token, self.dist_token) if t is not None]
        if self.num_pos_prefix:  # each has the position embedding at its own index
            prefix = [t + pos[:, i : i + 1] for i, t in enumerate(prefix)]
        if self.reg_token is not None:
            prefix.append(self.reg_token)
        if prefix:
            x = torch.cat([*(t.expand(x.shape[0], -1, -1) for t in prefix), x], dim=1)
        return self.norm_pre(self.pos_drop(x))

    @property
    def num_pos_prefix(self) -> int:
        """How many prefix tokens have a position embedding (0, 1, or 2 with distillation)."""
        return self.config.num_pos_embeds - self.config.num_patches

    # -- forward --------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, T, D)."""
        x = self.embed(x)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x, _ = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.norm(x)

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] = 1, norm: bool = False
    ) -> list[torch.Tensor]:
        """(B, C, H, W) -> the tokens (B, T, D) that the blocks at `indices` output, in that
        order: block numbers (negative from the end), or an int n for the last n blocks; with
        `norm`, each through the final norm (DINOv2's probes and dense heads read these).

        Blocks after the last one asked for are not run.
        """
        depth = len(self.blocks)
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"the last n blocks: n must be in 1..{depth}, got {indices}")
            indices = range(depth - indices, depth)
        if not indices or not all(-depth <= i < depth for i in indices):
            raise ValueError(f"block indices must be in {-depth}..{depth - 1}, got {indices}")
        wanted = [i % depth for i in indices]
        outputs = {}
        x = self.embed(x)
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x, _ = block(x)
            if i in wanted:
                outputs[i] = self.norm(x) if norm else x
        return [outputs[i] for i in wanted]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, T, D) -> pooled features (B, D) if `pre_logits`, else logits.

        A distilled model has two heads, on [CLS] and on the distillation token; it returns
        their mean (DeiT's inference, and fine-tuning without a teacher), or both when
        training with a teacher (`distilling`).
        """
        if self.head_dist is not None:
            cls, dist = (self.head_drop(self.fc_norm(t)) for t in (x[:, 0], x[:, 1]))
            if pre_logits:
                return (cls + dist) / 2
            if self.distilling and self.training:
                return self.head(cls), self.head_dist(dist)
            return (self.head(cls) + self.head_dist(dist)) / 2
        if self.config.pool == "cls":
            x = x[:, 0]
        elif self.attn_pool is not None:  # as timm: the probe reads patch tokens only
            x = self.attn_pool(x[:, self.config.num_prefix_tokens :])
        else:
            x = x[:, self.config.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> raw logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every layer's attention probabilities (B, heads, T, T).

        Slower than `forward` (the attention matrix is materialised); use it to explain.
        """
        x = self.embed(x)
        maps = []
        for block in self.blocks:
            x, weights = block(x, need_weights=True)
            maps.append(weights)
        return self.forward_head(self.norm(x)), maps

    def reset_head(self, num_classes: int) -> None:
        """New, zero-initialised heads for `num_classes` classes (fine-tuning)."""
        self.config = self.config.replace(num_classes=num_classes)
        self.head = self._new_head()
        self.head_dist = self._new_head() if self.config.distilled else None
        self.labels = None

    # -- resolution -----------------------------------------------------------------
    @torch.no_grad()
    def set_image_size(self, image_size: int) -> None:
        """Resample the position embeddings (bicubic) for a new native resolution."""
        new = self.config.replace(image_size=image_size)
        if new.grid_size != self.config.grid_size:
            pos = resample_pos_embed(self.pos_embed.data, (new.grid_size,) * 2, self.num_pos_prefix)
            self.pos_embed = nn.Parameter(pos)
        self.config = new


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """Bicubically resample (1, prefix + g*g, D) position embeddings to a `grid` of patches.

    Prefix ([CLS], distillation token) embeddings are kept as they are; the identity at the
    same grid.
    """
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    old = math.isqrt(patches.shape[1])
    if (old, old) == tuple(grid):
        return pos
    d = patches.shape[-1]
    patches = patches.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos.dtype)
    return torch.cat([prefix, patches], dim=1)


def count_params(model: nn.Module | ViTConfig) -> int:
    """Parameters of a model, or of the model a config describes (without building it)."""
    if isinstance(model, ViTConfig):
        return sum(math.prod(shape) for shape in state_shapes(model).values())
    return sum(p.numel() for p in model.parameters())


def state_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in the model's state dict, from a model built on the
    meta device: no memory spent, so a weights file can be checked before the model is built."""
    with torch.device("meta"):
        model = ViT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def flops(config: ViTConfig, image_size: int | None = None) -> int:
    """Forward FLOPs for one image (a multiply-add counts as 2), matmuls and convolutions only."""
    c = config
    size = image_size or c.image_size
    n = (size // c.token_stride) ** 2
    t = n + c.num_prefix_tokens
    d, m = c.width, c.mlp_dim
    patch = n * d * c.cnn_channels * c.patch_size**2
    if c.resnet_layers is not None:
        patch += resnet_macs(c.in_channels, c.resnet_layers, c.resnet_width, c.resnet_stem, size)
    mlp = (3 if c.mlp == "swiglu" else 2) * d * m  # SwiGLU: gate, value and fc2 matrices
    per_block = t * (3 * d * d + d * d + mlp) + 2 * t * t * d  # projections + QK^T, AV
    head = d * c.num_classes * (2 if c.distilled else 1)
    if c.pool == "map":  # the probe's q, proj and MLP; k, v of the patch tokens; QK^T, AV
        head += d * d + 2 * n * d * d + d * d + 2 * d * m + 2 * n * d
    return 2 * (patch + c.depth * per_block + head)
