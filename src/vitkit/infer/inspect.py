"""Look inside a Vision Transformer as its paper does (Dosovitskiy et al., 2021, Fig. 7 and
Appendix D.7), for any vitkit model:

- the filters that first see the pixels (the patch embedding's; a hybrid's first CNN
  convolution) and their top principal components;
- how similar each patch's position embedding is to every other patch's, at the model's grid
  and resampled to another (as for a new input size);
- how far each head attends (mean attention distance, in pixels of the input image) and how
  spread its attention is (entropy, nats), layer by layer, over a set of images.

    result = inspect_model(model, images, num_images=256)    an `Inspection` (numpy arrays)
    print(result.summary()); result.save("out/")             figures and inspect.json

Attention statistics read the patch tokens' rows only: each patch query's weights over the
patch keys, renormalised to sum to one once the prefix keys ([CLS], registers, the
distillation token) are dropped, so that a head that parks weight on [CLS] is measured by
where the rest of its weight goes; how much went to the prefix is reported beside
(`prefix_attention`).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitkit.data.dataset import ImageDataset
from vitkit.data.preprocess import centre_crop, load_image, preprocess
from vitkit.data.stream import ImageStream
from vitkit.evaluate import MAX_BATCH_PIXELS
from vitkit.files import atomic_write
from vitkit.infer.embed import PROGRESS_DELAY_S
from vitkit.model.vit import ViT, resample_pos_embed
from vitkit.plots import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Images = torch.Tensor | ImageDataset | ImageStream | Sequence[str | Path]

# The figures `Inspection.save` writes (NAME.png) and the numbers beside them.
FIGURES = ("filters", "position_similarity", "attention_distance", "attention_entropy")
REPORT = "inspect.json"
# The paper's Fig. 7 (left) shows the first 28 principal components of the filters.
NUM_COMPONENTS = 28
# Every layer's attention (B, heads, T, T) of a batch is held at once: at most this many
# numbers (256 MB in fp32; 11 images of a B/16 at 224 px, hundreds of small ones).
MAX_ATTENTION_NUMBERS = 2**26


# -- the maths ---------------------------------------------------------------------------
def embedding_filters(model: ViT) -> tuple[torch.Tensor, str]:
    """The kernels (out, C, k, k) that first see the pixels, as the model applies them, and
    the module they are in: the patch embedding's, or for a hybrid (whose patch embedding
    reads feature maps, not pixels) its CNN's first convolution, weight-standardised."""
    backbone = model.patch_embed.backbone
    if backbone is None:
        return model.patch_embed.proj.weight.detach().float().cpu(), "patch_embed.proj"
    with torch.no_grad():
        weight = backbone.stem.conv.standardized_weight()
    return weight.float().cpu(), "patch_embed.backbone.stem.conv"


def unit_scale(maps: torch.Tensor) -> torch.Tensor:
    """Each item of (n, ...) scaled to [0, 1] on its own, for display; a constant one is 0.5."""
    flat = maps.reshape(len(maps), -1)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    scaled = torch.where(hi > lo, (flat - lo) / (hi - lo).clamp_min(1e-30), 0.5)
    return scaled.reshape(maps.shape)


def principal_components(
    filters: torch.Tensor, k: int = NUM_COMPONENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `k` principal components of filters (n, C, kh, kw), each flattened: unit
    vectors shaped as filters (at most min(k, n, C*kh*kw)), and the share of the filters'
    variance that each explains."""
    flat = filters.reshape(len(filters), -1).double()
    _, s, vt = torch.linalg.svd(flat - flat.mean(dim=0), full_matrices=False)
    variance = s**2
    share = variance / variance.sum() if variance.sum() > 0 else torch.zeros_like(variance)
    components = vt[:k]
    # A component's sign is arbitrary: make each one's largest entry positive, so that the
    # same filters always give the same pictures.
    peak = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * torch.where(peak < 0, -1.0, 1.0)
    return components.reshape(-1, *filters.shape[1:]).float(), share[:k].float()


def position_similarity(model: ViT, grid: int | None = None) -> torch.Tensor:
    """Cosine similarity (g, g, g, g) of the patches' position embeddings: [i, j] is the map
    of patch (i, j)'s similarity to every patch. Prefix tokens' embeddings ([CLS], the
    distillation token) are left out. With `grid`, the embeddings are first resampled to a
    grid x grid of patches, as the model does for another input size."""
    prefix, g = model.num_pos_prefix, model.config.grid_size
    pos = model.pos_embed.detach().float().cpu()
    if grid is not None:
        pos, g = resample_pos_embed(pos, (grid, grid), prefix), grid
    patches = F.normalize(pos[0, prefix:], dim=-1)
    return (patches @ patches.T).reshape(g, g, g, g)


def patch_distances(grid: int, patch_pixels: float) -> torch.Tensor:
    """(N, N) Euclidean distances in pixels between the centres of a grid x grid of patches,
    `patch_pixels` apart, in the tokens' (row-major) order."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_pixels
    return torch.cdist(centres, centres)


def head_statistics(
    attention: torch.Tensor, num_prefix: int, patch_pixels: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's attention (B, heads, T, T) -> each image's and head's mean attention
    distance (pixels), entropy (nats) and share of weight on prefix tokens, (B, heads) each,
    averaged over the patch queries.

    A patch query's row is renormalised over the patch keys (the prefix keys dropped; see the
    module's docstring); its distance is the weighted mean of its keys' distances from it.
    """
    rows = attention[..., num_prefix:, :].double()  # the patch queries
    on_prefix = rows[..., :num_prefix].sum(dim=-1)
    rows = rows[..., num_prefix:]
    rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    grid = math.isqrt(rows.shape[-1])
    if grid * grid != rows.shape[-1]:
        raise ValueError(f"{rows.shape[-1]} patch tokens do not make a square grid")
    distances = patch_distances(grid, patch_pixels).to(rows.device)
    distance = (rows * distances).sum(dim=-1).mean(dim=-1)
    entropy = torch.special.entr(rows).sum(dim=-1).mean(dim=-1)
    return distance, entropy, on_prefix.mean(dim=-1)


# -- images in, arrays out -------------------------------------------------------------------
@dataclass
class Inspection:
    """What `inspect_model` found. Arrays are numpy; the attention statistics are None when
    no images were given. `patch_pixels` is the side of the image area each token covers:
    the patch size, or for a hybrid image_size / grid."""

    image_size: int
    grid: int  # patches per side
    patch_pixels: int
    num_prefix_tokens: int
    filter_source: str  # the module whose kernels `filters` are
    filters: np.ndarray  # (out, C, k, k), each scaled to [0, 1]
    components: np.ndarray  # (n, C, k, k) principal components, each scaled to [0, 1]
    component_variance: np.ndarray  # (n,) the share of the filters' variance of each
    position_similarity: np.ndarray  # (g, g, g, g)
    resampled_grid: int | None = None
    resampled_similarity: np.ndarray | None = None  # (G, G, G, G) at resampled_grid
    num_images: int = 0
    distance: np.ndarray | None = None  # (layers, heads) mean attention distance, pixels
    entropy: np.ndarray | None = None  # (layers, heads) nats
    prefix_attention: np.ndarray | None = None  # (layers, heads) share of weight on prefix

    @property
    def max_entropy(self) -> float:
        """The entropy of a head that attends to every patch alike: log(patches), nats."""
        return math.log(self.grid**2)

    @property
    def uniform_distance(self) -> float:
        """The mean attention distance of a head that attends to every patch alike, pixels."""
        return patch_distances(self.grid, self.patch_pixels).mean().item()

    def to_dict(self) -> dict[str, Any]:
        """Every number but the pictures' pixels, rounded, for JSON."""
        out: dict[str, Any] = {
            "image_size": self.image_size,
            "grid": self.grid,
            "patch_pixels": self.patch_pixels,
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_images": self.num_images,
            "filters": {"source": self.filter_source, "shape": list(self.filters.shape)},
            "component_variance": _rounded(self.component_variance),
            "position_similarity": _rounded(self.position_similarity),
            "resampled_grid": self.resampled_grid,
            "attention": None,
        }
        if self.distance is not None:
            out["attention"] = {
                "distance_px": _rounded(self.distance),
                "entropy_nats": _rounded(self.entropy),
                "prefix_share": _rounded(self.prefix_attention),
                "uniform_distance_px": round(self.uniform_distance, 4),
                "max_entropy_nats": round(self.max_entropy, 4),
            }
        return out

    def summary(self) -> str:
        """A few lines: the filters, the position embeddings, and per layer the heads' least,
        mean and greatest attention distance with their entropy."""
        n, *shape = self.filters.shape
        held = self.component_variance.sum()
        lines = [
            f"filters: {n} of {' x '.join(map(str, shape))}, from {self.filter_source}",
            f"principal components of the filters: the top {len(self.component_variance)} "
            f"hold {held:.0%} of their variance",
            f"position embeddings, {self.grid} x {self.grid} grid: cosine similarity "
            f"{_neighbour_similarity(self.position_similarity):.2f} between adjacent patches, "
            f"{self.position_similarity.mean():.2f} over all pairs",
        ]
        if self.distance is None or self.entropy is None or self.prefix_attention is None:
            return "\n".join([*lines, "attention: no images given"])
        half = self.image_size / 2
        lines += [
            f"attention of the patch tokens over {self.num_images:,} images ({self.grid} x "
            f"{self.grid} tokens of {self.patch_pixels} px; a uniform head: "
            f"{self.uniform_distance:.1f} px, {self.max_entropy:.2f} nats):",
            "layer   distance px: min   mean    max   entropy nats   on prefix",
        ]
        for i, (d, h, p) in enumerate(
            zip(self.distance, self.entropy, self.prefix_attention, strict=True), start=1
        ):
            lines.append(
                f"{i:>5}   {d.min():>16.1f} {d.mean():>6.1f} {d.max():>6.1f}   "
                f"{h.mean():>12.2f}   {p.mean():>9.0%}"
            )
        far = int((self.distance[0] > half).sum())
        lines.append(
            f"layer 1: {far} of {self.distance.shape[1]} heads attend further than half the "
            f"image ({half:g} px) on average"
        )
        return "\n".join(lines)

    def figures(self) -> dict[str, Figure]:
        """The figures by name (see `FIGURES`); the attention ones only with images."""
        out = {"filters": _filters_figure(self), "position_similarity": _position_figure(self)}
        if self.distance is not None and self.entropy is not None:
            out["attention_distance"] = _distance_figure(self.distance, self.uniform_distance)
            out["attention_entropy"] = _entropy_figure(self.entropy, self.max_entropy)
        return out

    def pngs(self) -> dict[str, bytes]:
        """The figures as PNG files' bytes, by name."""
        out = {}
        for name, fig in self.figures().items():
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110)
            out[name] = buffer.getvalue()
        return out

    def save(self, out_dir: str | Path) -> list[Path]:
        """NAME.png for each figure and inspect.json in `out_dir`; the paths written."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, png in self.pngs().items():
            atomic_write(out_dir / f"{name}.png", png)
            written.append(out_dir / f"{name}.png")
        atomic_write(out_dir / REPORT, json.dumps(self.to_dict(), indent=1) + "\n")
        return [*written, out_dir / REPORT]


def inspect_model(
    model: ViT,
    images: Images | str | Path | None = None,
    num_images: int | None = None,
    resample_grid: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Inspection:
    """Inspect `model`: its filters and position embeddings, and with `images`, its attention.

    `images`: uint8 (N, C, H, W) or float in [0, 1], any size (preprocessed as the model
    expects), an `ImageDataset`, an `ImageStream`, or image files (cropped as the model was
    evaluated). With `num_images`, a fixed random sample of that many is used. `resample_grid`:
    position similarity also at that grid. A progress bar shows for work of more than a few
    seconds.
    """
    c = model.config
    raw, source = embedding_filters(model)
    components, share = principal_components(raw)
    resampled = position_similarity(model, resample_grid) if resample_grid else None
    result = Inspection(
        image_size=c.image_size,
        grid=c.grid_size,
        patch_pixels=c.token_stride,
        num_prefix_tokens=c.num_prefix_tokens,
        filter_source=source,
        filters=unit_scale(raw).numpy(),
        components=unit_scale(components).numpy(),
        component_variance=share.numpy(),
        position_similarity=position_similarity(model).numpy(),
        resampled_grid=resample_grid,
        resampled_similarity=None if resampled is None else resampled.numpy(),
    )
    if isinstance(images, (str, Path)):
        images = [images]
    if isinstance(images, torch.Tensor) and images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
    if images is not None:
        order = _sample(len(images), num_images)
        if not order:
            raise ValueError("no images to inspect the attention on")
        stats = _attention_statistics(model, images, order, batch_size, progress)
        result.distance, result.entropy, result.prefix_attention = stats
        result.num_images = len(order)
    return result


@torch.inference_mode()
def _attention_statistics(
    model: ViT, images: Images, order: list[int], batch_size: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean attention distance, entropy and prefix share (layers, heads), over the images."""
    c = model.config
    per_image = c.depth * c.heads * (c.num_prefix_tokens + c.num_patches) ** 2
    limits = (MAX_ATTENTION_NUMBERS // per_image, MAX_BATCH_PIXELS // c.image_size**2)
    batch_size = max(1, min(batch_size, *limits))
    device, dtype = model.input_spec()
    totals = torch.zeros(3, c.depth, c.heads, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with tqdm(
            total=len(order),
            desc="inspect",
            unit="img",
            disable=not progress,
            delay=PROGRESS_DELAY_S,
        ) as bar:
            for x in _batches(images, order, batch_size, model):
                _, attentions = model.forward_with_attention(preprocess(x.to(device), c).to(dtype))
                for layer, attention in enumerate(attentions):
                    stats = head_statistics(attention, c.num_prefix_tokens, c.token_stride)
                    totals[:, layer] += torch.stack([s.sum(dim=0) for s in stats]).cpu()
                bar.update(len(x))
    finally:
        model.train(was_training)
    distance, entropy, on_prefix = (totals / len(order)).numpy()
    return distance, entropy, on_prefix


def _sample(total: int, wanted: int | None) -> list[int]:
    """Indices of `wanted` of `total` items, a fixed random sample in order (all of them
    when `wanted` is None or no fewer)."""
    if wanted is not None and wanted < 1:
        raise ValueError(f"the number of images must be at least 1, got {wanted}")
    if wanted is None or wanted >= total:
        return list(range(total))
    picked = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:wanted]
    return picked.sort().values.tolist()


def _batches(
    images: Images, order: list[int], batch_size: int, model: ViT
) -> Iterator[torch.Tensor]:
    """The images at `order`, batch by batch, as uint8 (or float) (B, C, H, W)."""
    if isinstance(images, ImageStream):
        yield from (x for x, _ in images.batches(0, order, batch_size, drop_last=False))
        return
    c = model.config
    crop = centre_crop(c.crop_pct)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        if isinstance(images, ImageDataset):
            yield images.images[chosen]
        elif isinstance(images, torch.Tensor):
            yield images[chosen]
        else:
            files = [images[i] for i in chosen]
            yield torch.stack(
                [
                    load_image(f, c.in_channels, c.image_size, c.interpolation, crop=crop)
                    for f in files
                ]
            )


# -- pictures -----------------------------------------------------------------------------
def tile(maps: np.ndarray, cols: int | None = None, fill: float = np.nan) -> np.ndarray:
    """Maps (n, h, w) or (n, h, w, 3) laid out in rows of `cols` (default: a square), one
    pixel of `fill` between them: one image, (rows * (h + 1) - 1, cols * (w + 1) - 1, ...)."""
    n, h, w = maps.shape[:3]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, *maps.shape[3:]), fill)
    for i, m in enumerate(maps):
        r, col = divmod(i, cols)
        out[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = m
    return out


def _pictures(filters: np.ndarray) -> np.ndarray:
    """Filters (n, C, k, k) in [0, 1] as pictures: RGB (n, k, k, 3) for three channels, else
    grey (n, k, k), the channels' mean."""
    if filters.shape[1] == 3:
        return filters.transpose(0, 2, 3, 1)
    return filters.mean(axis=1)


def _filters_figure(result: Inspection) -> Figure:
    fig = new_figure(figsize=(11, 5.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    n, *shape = result.filters.shape
    colour = result.filters.shape[1] == 3
    for ax, maps, title in (
        (left, result.filters, f"{n} filters, {' x '.join(map(str, shape))}"),
        (
            right,
            result.components,
            f"top {len(result.components)} principal components "
            f"({result.component_variance.sum():.0%} of the variance)",
        ),
    ):
        picture = tile(_pictures(maps), fill=1.0 if colour else np.nan)
        ax.imshow(picture, cmap=None if colour else "gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"embedding filters ({result.filter_source})", fontsize=11)
    return fig


def _position_figure(result: Inspection) -> Figure:
    panels = [(result.position_similarity, f"{result.grid} x {result.grid} (native)")]
    if result.resampled_similarity is not None:
        g = result.resampled_grid
        panels.append((result.resampled_similarity, f"{g} x {g} (resampled)"))
    fig = new_figure(figsize=(5.4 * len(panels) + 1, 5.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (similarity, title) in zip(axes, panels, strict=True):
        g = similarity.shape[0]
        maps = similarity.reshape(g * g, g, g)
        image = ax.imshow(
            tile(maps, cols=g), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest"
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("input patch column")
        ax.set_ylabel("input patch row")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine similarity")
    fig.suptitle("position embedding similarity", fontsize=11)
    return fig


def _distance_figure(distance: np.ndarray, uniform: float) -> Figure:
    fig = new_figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    layers, heads = distance.shape
    depth = np.arange(1, layers + 1)
    for h in range(heads):
        ax.scatter(depth, distance[:, h], s=16, label=f"head {h + 1}")
    ax.axhline(uniform, color="grey", ls="--", lw=1, label="uniform attention")
    if heads <= 12:
        ax.legend(fontsize=7, ncols=2)
    ax.set_xticks(depth)
    ax.set_ylim(0, max(uniform, float(distance.max())) * 1.1)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.grid(alpha=0.3)
    return fig


def _entropy_figure(entropy: np.ndarray, max_entropy: float) -> Figure:
    layers, heads = entropy.shape
    fig = new_figure(figsize=(min(3 + 0.5 * heads, 12), min(2 + 0.4 * layers, 12)))
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot()
    image = ax.imshow(entropy, cmap="viridis", vmin=0, vmax=max_entropy, aspect="auto")
    fig.colorbar(image, ax=ax, label=f"entropy (nats; uniform: {max_entropy:.2f})")
    ax.set_xticks(range(heads), labels=[str(h + 1) for h in range(heads)])
    ax.set_yticks(range(layers), labels=[str(i + 1) for i in range(layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if layers * heads <= 200:
        for (i, h), value in np.ndenumerate(entropy):
            colour = "black" if value > 0.6 * max_entropy else "white"
            ax.text(h, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_title("attention entropy of the patch tokens", fontsize=10)
    return fig


def _neighbour_similarity(similarity: np.ndarray) -> float:
    """The mean cosine similarity of horizontally or vertically adjacent patches."""
    g = similarity.shape[0]
    pairs = [similarity[r, c, r, c + 1] for r in range(g) for c in range(g - 1)]
    pairs += [similarity[r, c, r + 1, c] for r in range(g - 1) for c in range(g)]
    return float(np.mean(pairs)) if pairs else float("nan")


def _rounded(values: np.ndarray | None) -> Any:
    return None if values is None else np.round(values.astype(np.float64), 4).tolist()


__all__ = [
    "FIGURES",
    "Inspection",
    "embedding_filters",
    "head_statistics",
    "inspect_model",
    "patch_distances",
    "position_similarity",
    "principal_components",
    "tile",
    "unit_scale",
]
