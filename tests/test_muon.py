"""Muon for the encoder blocks' weight matrices, AdamW for everything else: an exact partition,
one schedule, and a saved state that resumes to the uninterrupted run's weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vitkit import create_model, load_model
from vitkit.cli import build_parser
from vitkit.cli.train import _config
from vitkit.train import TrainConfig, train
from vitkit.train.muon import Muon, orthogonalize
from vitkit.train.optim import build_optimizers

TINY = {"image_size": 8, "patch_size": 2, "width": 32, "depth": 2, "heads": 2}
# The encoder's matrices, block by block: all that Muon takes.
MATRICES = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")


def tiny_config(**kw) -> TrainConfig:
    settings = {
        "data": "digits",
        "model": "Ti/4@28",
        "model_overrides": TINY,
        "optimizer": "muon",
        "epochs": 1,
        "batch_size": 128,
        "lr": 2e-3,
        "warmup_epochs": 0.5,
        "precision": "fp32",
        "ema_decay": 0.9,
        "augment": {"crop_padding": 1},
    }
    return TrainConfig.from_dict(settings | kw)


@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_every_parameter_has_exactly_one_optimiser(layer_decay):
    # The hybrid: its convolution kernels (4-D) stay on AdamW.
    model = create_model(
        "Ti/7@28", image_size=32, width=32, heads=2, depth=2, patch_size=1, resnet_layers=[1]
    )
    adamw, muon = build_optimizers(model, 1e-3, 0.05, layer_decay, muon=True)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    owned = [[names[id(p)] for g in o.param_groups for p in g["params"]] for o in (adamw, muon)]
    assert sorted(owned[0] + owned[1]) == sorted(names.values())  # each once, none left out
    assert sorted(owned[1]) == sorted(f"blocks.{i}.{m}" for i in range(2) for m in MATRICES)
    assert any(n.startswith("patch_embed.backbone") and n.endswith("conv.weight") for n in owned[0])
    assert all(g["weight_decay"] == 0.05 for g in muon.param_groups)
    # Layer decay: the blocks' Muon groups keep their layer's lr scale.
    scales = sorted(g["lr_scale"] for g in muon.param_groups)
    assert scales == ([0.25, 0.5] if layer_decay else [1.0])


def test_kernels_follow_muon_on_request_all_but_the_pixels_first():
    model = create_model(
        "Ti/7@28", image_size=32, width=32, heads=2, depth=2, patch_size=1, resnet_layers=[1]
    )
    _, muon = build_optimizers(model, 1e-3, 0.05, muon=True, muon_kernels=True)
    names = {id(p): n for n, p in model.named_parameters()}
    owned = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    kernels = {n for n, p in model.named_parameters() if p.ndim == 4}
    assert owned - kernels == {f"blocks.{i}.{m}" for i in range(2) for m in MATRICES}
    assert kernels - owned == {"patch_embed.backbone.stem.conv.weight", "patch_embed.proj.weight"}


@pytest.mark.parametrize("nesterov", [True, False])
def test_bf16_updates_equal_torchs_muon(nesterov):
    # torch.optim.Muon orthogonalises in bf16: ours in bf16 is the same update, bit for bit.
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32)]
    ours = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = {"lr": 0.01, "weight_decay": 0.1, "momentum": 0.9, "nesterov": nesterov}
    optimizers = (
        Muon(ours, precision="bf16", **kw),
        torch.optim.Muon(theirs, adjust_lr_fn="match_rms_adamw", **kw),
    )
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for params, optimizer in zip((ours, theirs), optimizers, strict=True):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_fp32_orthogonalises_like_bf16_and_kernels_as_matrices():
    g = torch.randn(96, 384, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = orthogonalize(g, "fp32"), orthogonalize(g, "bf16")
    assert fp32.dtype == torch.float32
    s = torch.linalg.svdvals(fp32)  # the quintic's band, not exactly 1 (0.68-1.13 when written)
    assert s.min() > 0.5 and s.max() < 1.5
    assert (fp32 - bf16).abs().max() < 0.02 < 1 < (g - fp32).abs().max()
    # A kernel steps as its (out, in x kh x kw) matrix would.
    kernel = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    params = [kernel.clone().requires_grad_(), kernel.reshape(8, 36).clone().requires_grad_()]
    for p, g in zip(params, [kernel, kernel.reshape(8, 36)], strict=True):
        p.grad = g.clone()
    Muon(params, lr=0.01).step()
    assert torch.equal(params[0].detach().reshape(8, 36), params[1].detach())
    with pytest.raises(ValueError, match="not a 1-D tensor"):
        Muon([torch.zeros(3, requires_grad=True)])


def test_matrices_of_one_shape_are_orthogonalised_together_as_one_by_one():
    gen = torch.Generator().manual_seed(2)
    stack = torch.randn(3, 24, 40, generator=gen)
    for precision, tol in (("fp32", 1e-5), ("bf16", 2e-2)):
        together = orthogonalize(stack, precision)
        alone = torch.stack([orthogonalize(m, precision) for m in stack])
        torch.testing.assert_close(together, alone, atol=tol, rtol=0)
    # The optimiser batches same-shaped parameters and steps each as it would alone.
    params = [m.clone().requires_grad_() for m in stack]
    singles = [m.clone().requires_grad_() for m in stack]
    for p, q, g in zip(params, singles, torch.randn(3, 24, 40, generator=gen), strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    Muon(params, lr=0.01).step()
    for q in singles:
        Muon([q], lr=0.01).step()
    for p, q in zip(params, singles, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)


def test_muon_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="linear probe trains the head only"):
        tiny_config(linear_probe=True)
    with pytest.raises(ValueError, match="not with shard"):
        tiny_config(shard=True)
    with pytest.raises(ValueError, match="muon_kernels needs optimizer muon"):
        tiny_config(optimizer="adamw", muon_kernels=True)
    assert _config(build_parser().parse_args(["train", "--optimizer", "muon"])).optimizer == "muon"


def test_a_few_steps_reduce_the_loss(digits):
    images, labels = digits[0].images[:128].float() / 255, digits[0].labels[:128]
    model = create_model("Ti/4@28", seed=0, **TINY)
    # A zero head would stop every gradient before the blocks.
    torch.nn.init.normal_(model.head.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    optimizers = build_optimizers(model, 5e-3, 0.05, muon=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(images), labels)
        for o in optimizers:
            o.zero_grad()
        loss.backward()
        for o in optimizers:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0], losses  # 2.31 -> 2.01 when written
    after = dict(model.named_parameters())
    assert all(
        not torch.equal(before[n], after[n]) for n in ("blocks.0.mlp.fc1.weight", "head.weight")
    )


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(digits, tmp_path):
    full = train(tiny_config(), tmp_path / "full", progress=False, datasets=digits)
    train(tiny_config(max_steps=5), tmp_path / "part", progress=False, datasets=digits)
    state = json.loads(next((tmp_path / "part/checkpoints").glob("step-5/state.json")).read_text())
    kinds = {"muon" if "momentum" in g else "adamw" for g in state["param_groups"]}
    assert kinds == {"adamw", "muon"}  # both optimisers' settings are saved
    resumed = train(TrainConfig(), tmp_path / "part", resume=True, progress=False, datasets=digits)
    assert resumed.step == full.step == len(digits[0]) // 128
    a, b = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "part").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val_acc == full.val_acc
