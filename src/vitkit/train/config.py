"""Training configuration: a dataclass, loadable from a small TOML recipe file."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vitkit.config import brief, is_instance, type_name
from vitkit.data.transforms import AugmentConfig


@dataclass
class TrainConfig:
    data: str = "fashion-mnist"
    data_dir: str | None = None
    val_fraction: float = 0.1  # collections without their own validation split
    # Named datasets: validate on this many training images (stratified, always the same ones)
    # and evaluate the test split once, at the end; 0 validates on the test split.
    holdout: int = 0
    # Collections (not named datasets): decode file by file in worker processes (True), into
    # memory (False), or whichever the memory budget allows (None: `data.stream.memory_budget`).
    stream: bool | None = None
    workers: int | None = None  # decoding processes when streaming; None: one per core
    # A Hugging Face dataset's columns; None: picked by their features.
    image_column: str | None = None
    label_column: str | None = None
    model: str | None = None  # preset; None picks one suited to the dataset's image size
    model_overrides: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    max_steps: int | None = None  # stop early (the schedule still spans `epochs`)
    batch_size: int = 256  # the global batch: all processes and micro-batches together
    grad_accum: int = 1  # micro-batches per process and step, their gradients added up
    shard: bool = False  # FSDP2: weights, gradients and optimiser state split across processes
    # "muon": the encoder blocks' weight matrices follow Muon, everything else AdamW.
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_kernels: bool = False  # with muon: the hybrid's CNN kernels follow Muon too
    lr: float = 1e-3
    min_lr_factor: float = 0.01
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float = 0.0  # 0 turns the EMA of weights off
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile the model: S/16 steps 11% faster (bf16, 2-core CPU) after ~30 s of
    # compiling, but the Fashion-MNIST preset's 6% slower, hence off unless asked for.
    compile: bool = False
    # Larger models and batches fit: 8% of S/16's activations kept, steps 10-25% slower.
    checkpoint_activations: bool = False
    # DeiT's distillation: a trained model (a model directory or shipped name) teaches the
    # distillation token's head (the model needs distilled = true): its predicted class
    # ("hard") or its probabilities at `distill_temperature` ("soft").
    teacher: str | None = None
    distill: Literal["hard", "soft"] = "hard"
    distill_temperature: float = 1.0
    # Progressive resizing: the first epochs see the images at this many pixels a side, growing
    # linearly to the model's size by `progressive_until` of the epochs (fewer tokens and a
    # cheaper CNN early on); None trains at the model's size throughout.
    progressive_size: int | None = None
    progressive_until: float = 0.5
    seed: int = 0
    # Minutes between saves of the training state within an epoch (every epoch's end saves
    # too): a killed run loses at most this much work.
    save_every: float = 5.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Fine-tuning: start from these weights (a model dir or name, a timm file, a Hugging Face
    # dir, a Google .npz); `num_classes` asks for a new head; the probe trains the head only.
    init: str | None = None
    num_classes: int | None = None
    linear_probe: bool = False
    layer_decay: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if isinstance(d.get("augment"), dict):
            try:
                d["augment"] = AugmentConfig(**d["augment"])
            except TypeError as e:
                raise ValueError(f"[augment]: {e}") from None
        _check_types(cls, d)
        cfg = cls(**d)
        if cfg.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.lr <= 0:
            raise ValueError("epochs, batch_size and grad_accum must be >= 1 and lr > 0")
        if cfg.workers is not None and cfg.workers < 0:
            raise ValueError(f"workers must be >= 0, got {cfg.workers}")
        if not cfg.save_every >= 0:
            raise ValueError(f"save_every must be >= 0 minutes, got {cfg.save_every}")
        if cfg.holdout < 0:
            raise ValueError(f"holdout must be >= 0 images, got {cfg.holdout}")
        if cfg.optimizer == "muon" and cfg.linear_probe:
            raise ValueError(
                "optimizer muon trains the encoder's weight matrices; a linear "
                "probe trains the head only: use adamw"
            )
        if cfg.optimizer == "muon" and cfg.shard:
            # Newton-Schulz orthogonalises whole matrices; FSDP2 gives each process a slice.
            raise ValueError("optimizer muon needs whole weight matrices: not with shard")
        if cfg.muon_kernels and cfg.optimizer != "muon":
            raise ValueError("muon_kernels needs optimizer muon")
        if not cfg.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {cfg.distill_temperature}")
        if cfg.teacher is not None and cfg.linear_probe:
            raise ValueError(
                "a teacher trains the distillation head and the encoder: not with a linear probe"
            )
        if cfg.progressive_size is not None and cfg.progressive_size < 1:
            raise ValueError(f"progressive_size must be >= 1 pixel, got {cfg.progressive_size}")
        if not 0 < cfg.progressive_until <= 1:
            raise ValueError(f"progressive_until must be in (0, 1], got {cfg.progressive_until}")
        return cfg


def _check_types(cls: type, settings: dict[str, Any]) -> None:
    """Every setting of the type its field declares (augment: already an AugmentConfig), so
    that a hand-edited or hostile file fails here, not deep inside training."""
    hints = typing.get_type_hints(cls)
    for key, value in settings.items():
        if key != "augment" and not is_instance(value, hints[key]):
            raise ValueError(
                f"training setting {key} must be {type_name(hints[key])}, got {brief(value)}"
            )


@dataclass
class Recipe:
    """A named training configuration and the result it reached (stated in the file)."""

    config: TrainConfig
    description: str = ""
    command: str = ""
    result: str = ""


def load_recipe(path: str | Path) -> Recipe:
    """Read a TOML recipe: [recipe] (description, command, result), [train] settings,
    [model] ViTConfig overrides, [augment] augmentation settings."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read recipe: {e}") from None
    try:
        meta = data.pop("recipe", {})
        settings = data.pop("train", {})
        settings["model_overrides"] = data.pop("model", {})
        settings["augment"] = data.pop("augment", {})
        if data:
            raise ValueError(
                f"unknown section(s) {', '.join(sorted(data))}; expected "
                "[recipe], [train], [model], [augment]"
            )
        return Recipe(TrainConfig.from_dict(settings), **meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
