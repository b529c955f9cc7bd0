"""Activation checkpointing: the same gradients and training run as without it, for a fraction of
the memory kept for the backward pass; inference untouched."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from vitkit import create_model, load_model
from vitkit.cli import build_parser
from vitkit.cli.train import _config
from vitkit.data import load_dataset
from vitkit.model.vit import ViT
from vitkit.train import TrainConfig, load_recipe, train
from vitkit.train.setup import model_and_data

# Every kind of random draw in a block: dropout, attention dropout, stochastic depth.
REGULARISED = {"depth": 4, "dropout": 0.1, "attn_dropout": 0.1, "drop_path": 0.2}


def _model(checkpointing: bool) -> ViT:
    model = create_model("Ti/7@28", seed=0, width=64, heads=2, **REGULARISED)
    # A trained head: the zero one of a new model would stop every gradient before the blocks.
    torch.nn.init.normal_(model.head.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    model.set_grad_checkpointing(checkpointing)
    return model.train()


def _loss_and_grads(model: ViT, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)  # the dropout masks
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.slow  # `test_keeps_a_fraction_of_the_activations` touches the module quickly
def test_same_loss_and_gradients_with_dropout_and_stochastic_depth():
    loss, grads = _loss_and_grads(_model(False))
    loss_ckpt, grads_ckpt = _loss_and_grads(_model(True))
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    torch.testing.assert_close(grads_ckpt, grads, rtol=1e-6, atol=1e-8)
    # The masks matter: other draws give other gradients, so the recomputation redrew the same.
    _, other = _loss_and_grads(_model(False), seed=2)
    assert not torch.allclose(other["blocks.0.attn.qkv.weight"], grads["blocks.0.attn.qkv.weight"])


@contextlib.contextmanager
def _saved_bytes(model: ViT) -> Iterator[dict[int, int]]:
    """Bytes of the storages autograd keeps for the backward pass, by storage (a tensor saved
    by several operations counts once), weights excluded: they are kept anyway."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _bytes_saved_for_backward(checkpointing: bool) -> int:
    model = _model(checkpointing)
    with _saved_bytes(model) as saved:
        loss = model(torch.randn(8, 1, 28, 28)).logsumexp(-1).mean()
    loss.backward()
    return sum(saved.values())


def test_keeps_a_fraction_of_the_activations():
    full, kept = _bytes_saved_for_backward(False), _bytes_saved_for_backward(True)
    # Four blocks: each now keeps its input alone, instead of some fifteen tensors of its size.
    assert kept < 0.25 * full, (kept, full)


def test_inference_and_attention_maps_unaffected():
    """In evaluation nothing is recomputed: the same tensors kept, the same results."""
    model = _model(True).eval()
    x = torch.randn(2, 1, 28, 28)
    with _saved_bytes(model) as saved:
        logits = model(x)
    logits_maps, maps = model.forward_with_attention(x)
    model.set_grad_checkpointing(False)
    with _saved_bytes(model) as saved_plain:
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    assert sum(saved.values()) == sum(saved_plain.values()) > 0
    torch.testing.assert_close(logits_maps, logits, rtol=1e-5, atol=1e-6)
    assert len(maps) == REGULARISED["depth"]


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return (
        load_dataset("digits", "train").subset(torch.arange(192)),
        load_dataset("digits", "test").subset(torch.arange(64)),
    )


@pytest.mark.slow
def test_flag_and_recipe_turn_it_on_for_training(tmp_path, digits):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[train]\ndata = "digits"\ncheckpoint_activations = true\n')
    assert load_recipe(recipe).config.checkpoint_activations
    assert not _config(build_parser().parse_args(["train"])).checkpoint_activations
    cfg = _config(build_parser().parse_args(["train", "--checkpoint-activations"]))
    assert cfg.checkpoint_activations
    model, *_ = model_and_data(cfg, None, digits)
    assert model.grad_checkpointing


def _train(run_dir, digits, **kw) -> dict[str, torch.Tensor]:
    settings = {
        "data": "digits",
        "model": "Ti/4@28",
        "model_overrides": {"image_size": 8, "patch_size": 2, "width": 32, "heads": 2}
        | REGULARISED,
        "epochs": 1,
        "batch_size": 32,
        "grad_accum": 2,
        "max_steps": 4,
        "warmup_epochs": 0.5,
        "precision": "fp32",
    }
    train(TrainConfig.from_dict(settings | kw), run_dir, progress=False, datasets=digits)
    return load_model(run_dir).state_dict()


@pytest.fixture(scope="module")
def plain_run(digits, tmp_path_factory) -> dict[str, torch.Tensor]:
    return _train(tmp_path_factory.mktemp("plain"), digits)


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True], ids=["plain", "fsdp"])
def test_training_run_ends_with_the_same_weights(tmp_path, digits, plain_run, shard):
    """A few steps with every random draw: the same weights with checkpointing as without, on
    one process or sharded by FSDP2 (a group of one)."""
    ckpt = _train(tmp_path, digits, checkpoint_activations=True, shard=shard)
    torch.testing.assert_close(ckpt, plain_run, rtol=1e-5, atol=1e-6)
