"""DeiT's distillation (Touvron et al., 2021): a trained teacher's predictions train the
distillation token's head while [CLS]'s head learns the labels; at inference the model
averages the two heads.

The teacher sees the student's augmented batch, converted to its own input (size, channels,
normalisation) where they differ, and is never trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkit.data.preprocess import match_channels, normalize, resize
from vitkit.model.vit import ViT
from vitkit.weights.format import load_model, resolve_model_dir


def load_teacher(spec: str, student: ViT, device: torch.device) -> ViT:
    """The teacher in `spec` (a model directory or shipped name), frozen, for `student`, which
    must have a distillation token and the same classes."""
    if not student.config.distilled:
        raise ValueError(
            "a teacher trains the distillation token's head: the model needs distilled = true "
            "([model] in a recipe)"
        )
    teacher = load_model(resolve_model_dir(spec)).to(device).eval().requires_grad_(False)
    if teacher.config.num_classes != student.config.num_classes:
        raise ValueError(
            f"teacher {spec} has {teacher.config.num_classes} classes, the model "
            f"{student.config.num_classes}"
        )
    if teacher.labels and student.labels and teacher.labels != student.labels:
        raise ValueError(f"teacher {spec} names its classes otherwise: {teacher.labels}")
    return teacher


@torch.no_grad()
def teacher_logits(teacher: ViT, student: ViT, x: torch.Tensor) -> torch.Tensor:
    """The teacher's fp32 logits for the student's normalised input batch `x`."""
    s, t = student.config, teacher.config
    same = (s.image_size, s.in_channels, s.mean, s.std) == (
        t.image_size,
        t.in_channels,
        t.mean,
        t.std,
    )
    if not same:
        mean = torch.tensor(s.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(s.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        pixels = (x * std + mean).clamp_(0, 1)
        pixels = resize(match_channels(pixels, t.in_channels), t.image_size, t.interpolation)
        x = normalize(pixels, t.mean, t.std)
    return teacher(x).float()


def distillation_loss(
    logits: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0
) -> torch.Tensor:
    """The distillation head's loss: cross-entropy with the teacher's class ("hard", DeiT's
    better choice), or the KL divergence from its probabilities at `temperature`, scaled by
    its square so that gradients keep their size ("soft", Hinton et al.)."""
    if kind == "hard":
        return F.cross_entropy(logits.float(), teacher.argmax(-1))
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(logits.float() / t, dim=-1),
            F.log_softmax(teacher / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )
