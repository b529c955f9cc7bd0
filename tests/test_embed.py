"""Embeddings (forward_intermediates, embed_images), k-NN classification on features, and the
`vitkit embed` and `vitkit eval --knn` commands."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.fashion import load_fashion_mnist
from vitkit import create_model, save_model
from vitkit.cli import main
from vitkit.data import ImageDataset, load_dataset
from vitkit.data.preprocess import centre_crop, load_image, preprocess
from vitkit.infer import embed_dataset, embed_images, knn_scores
from vitkit.infer import knn as knn_module
from vitkit.infer.knn import nearest

LABELS = ["dark", "bright"]


def small_model(**overrides):
    # Three narrow blocks: every code path of a real model at a fraction of the cost.
    return create_model("Ti/4@28", seed=0, width=32, heads=2, depth=3, **overrides).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)


def two_tone(n: int, seed: int) -> ImageDataset:
    """Dark noisy images (class 0) and bright ones (class 1), alternating."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    noise = torch.randint(0, 60, (n, 1, 28, 28), generator=gen)
    pixels = (noise + 190 * labels[:, None, None, None]).to(torch.uint8)
    return ImageDataset(pixels, labels, list(LABELS), "two-tone")


# -- forward_intermediates ----------------------------------------------------------------


def test_intermediates_are_the_blocks_outputs():
    model = small_model(num_registers=2)
    x = preprocess(images(3), model.config)
    with torch.no_grad():
        last_raw, last_normed = (model.forward_intermediates(x, [-1], norm=n)[0] for n in (0, 1))
        features = model.forward_features(x)
        # The final norm is the last step of forward_features: undo nothing, redo it.
        assert torch.allclose(last_normed, features, atol=1e-6)
        assert torch.allclose(model.norm(last_raw), features, atol=1e-6)
        assert not torch.allclose(last_raw, features, atol=1e-3)

        tokens, expected = model.embed(x), []
        for block in model.blocks:
            tokens, _ = block(tokens)
            expected.append(tokens)
        got = model.forward_intermediates(x, [2, 0, -2])
        for out, i in zip(got, [2, 0, 1], strict=True):
            assert out.shape == (3, model.config.num_patches + 3, 32)
            assert torch.allclose(out, expected[i], atol=1e-6)
        last_two = model.forward_intermediates(x, 2)
        assert len(last_two) == 2 and torch.allclose(last_two[0], expected[1], atol=1e-6)


@pytest.mark.parametrize("indices", [0, 4, [3], [-4], []])
def test_intermediates_refuse_blocks_the_model_lacks(indices):
    model = small_model()
    with pytest.raises(ValueError, match="block"):
        model.forward_intermediates(torch.zeros(1, 1, 28, 28), indices)


# -- embed_images -------------------------------------------------------------------------


def test_embeddings_are_unit_pooled_features_whatever_the_batch():
    model = small_model().train()
    x = images(7)
    one_batch = embed_images(model, x, batch_size=7, progress=False)
    assert model.training  # its mode is given back
    model.eval()
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(preprocess(x, model.config)), True)
    assert one_batch.shape == (7, 32) and one_batch.dtype == torch.float32
    assert torch.allclose(one_batch.norm(dim=1), torch.ones(7), atol=1e-6)
    assert torch.allclose(one_batch, F.normalize(pooled, dim=1), atol=1e-6)
    for batch_size in (1, 3):
        assert torch.allclose(
            embed_images(model, x, batch_size=batch_size, progress=False), one_batch, atol=1e-5
        )
    # A dataset gives the same rows, and its labels with them.
    ds = ImageDataset(x, torch.arange(7) % 2, list(LABELS), "toy")
    features, labels = embed_dataset(model, ds, batch_size=4, progress=False)
    assert torch.allclose(features, one_batch, atol=1e-5) and labels.tolist() == ds.labels.tolist()


def test_patch_features_skip_every_prefix_token():
    model = small_model(num_registers=2)
    x = images(4)
    features, patches = embed_images(model, x, batch_size=3, patch_features=True, progress=False)
    assert patches.shape == (4, model.config.num_patches, 32)
    with torch.no_grad():
        tokens = model.forward_features(preprocess(x, model.config))
    assert torch.allclose(patches, tokens[:, 3:], atol=1e-5)  # [CLS] and 2 registers dropped
    assert torch.allclose(features, embed_images(model, x, progress=False), atol=1e-6)


def test_embed_images_refuses_what_it_cannot_embed():
    model = small_model()
    with pytest.raises(ValueError, match="no images"):
        embed_images(model, images(0), progress=False)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        embed_images(model, images(2)[0], progress=False)
    with pytest.raises(TypeError, match="ViT"):
        embed_images(torch.nn.Linear(2, 2), images(2), progress=False)


# -- k-NN ---------------------------------------------------------------------------------


def unit(degrees: float, scale: float = 1.0) -> list[float]:
    return [scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))]


# One bank feature of class 0 where the query points; two of class 1 at 30 degrees from it,
# one of class 2 opposite. Lengths differ: only the directions may count.
BANK = torch.tensor([unit(0, 2.0), unit(30), unit(-30, 0.5), unit(180)])
BANK_LABELS = torch.tensor([0, 1, 1, 2])
QUERY = torch.tensor([unit(0, 3.0)])


def test_knn_votes_as_dino_weighs_them():
    cos30 = math.cos(math.radians(30))
    # The nearest alone: class 0, at any temperature.
    assert knn_scores(BANK, BANK_LABELS, QUERY, 3, k=1, temperature=1.0).argmax() == 0
    # Three neighbours at a high temperature: two votes of class 1 outweigh one of class 0...
    scores = knn_scores(BANK, BANK_LABELS, QUERY, 3, k=3, temperature=1.0)[0]
    assert scores.argmax() == 1
    shares = scores / scores.sum()
    votes = torch.tensor([math.exp(1.0), 2 * math.exp(cos30), 0.0])
    assert torch.allclose(shares, votes / votes.sum(), atol=1e-6)
    # ...at DINO's 0.07 the nearest one's exp(similarity / T) outweighs them.
    assert knn_scores(BANK, BANK_LABELS, QUERY, 3, k=3, temperature=0.07).argmax() == 0
    # k beyond the bank: all four vote; a small temperature neither overflows nor underflows
    # the winner.
    scores = knn_scores(BANK, BANK_LABELS, QUERY, 3, k=20, temperature=0.001)[0]
    assert torch.isfinite(scores).all() and scores[0] == 1.0 and scores[2] == 0.0


def test_knn_in_chunks_is_the_brute_force_answer(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 8, generator=gen), torch.randn(50, 8, generator=gen)
    labels = torch.randint(0, 4, (300,), generator=gen)
    sims = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    top = sims.topk(5, dim=1)
    votes = torch.zeros(50, 4).scatter_add_(1, labels[top.indices], torch.exp(top.values / 0.1))
    monkeypatch.setattr(knn_module, "MAX_SIMILARITIES", 600)  # two queries at a time
    chunked_sims, chunked_indices = nearest(bank, queries, 5)
    assert torch.equal(chunked_indices, top.indices)
    assert torch.allclose(chunked_sims, top.values, atol=1e-6)
    scores = knn_scores(bank, labels, queries, 4, k=5, temperature=0.1)
    assert torch.allclose(
        scores / scores.sum(1, keepdim=True), votes / votes.sum(1, keepdim=True), atol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must"),
        ({"temperature": 0.0}, "temperature"),
        ({"labels": torch.tensor([0, 1, 1, 3])}, "labels"),
        ({"labels": torch.tensor([0, 1])}, "labels"),
    ],
)
def test_knn_refuses_bad_settings(kwargs, message):
    labels = kwargs.pop("labels", BANK_LABELS)
    with pytest.raises(ValueError, match=message):
        knn_scores(BANK, labels, QUERY, 3, **kwargs)


# -- vitkit embed -------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    return save_model(small_model(num_classes=2), tmp_path / "model", labels=list(LABELS))


def test_embed_command_writes_features_and_names(model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    out = tmp_path / "emb.safetensors"

    argv = ["embed", str(model_dir), str(folder), "--out", str(out), "--batch-size", "2"]
    assert main([*argv, "--patch-tokens"]) == 1  # written, but one file could not be read
    assert "broken.png" in capsys.readouterr().err
    tensors = load_file(out)
    with safe_open(out, framework="pt") as f:
        names = json.loads(f.metadata()["names"])
    assert names == [str(folder / n) for n in ("a.jpg", "b.png", "sub/c.png")]
    assert tensors["features"].shape == (3, 32) and tensors["patch_tokens"].shape == (3, 49, 32)

    model = small_model(num_classes=2)
    c = model.config
    decoded = torch.stack(
        [load_image(n, 1, 28, c.interpolation, crop=centre_crop(c.crop_pct)) for n in names]
    )
    assert torch.allclose(tensors["features"], embed_images(model, decoded), atol=1e-5)

    assert main(["embed", str(model_dir), str(folder / "a.jpg"), "--out", str(out)]) == 0
    assert set(load_file(out)) == {"features"}
    assert main(["embed", str(model_dir), str(folder / "broken.png"), "--out", str(out)]) == 2


# -- vitkit eval --knn --------------------------------------------------------------------


def test_eval_knn_command_on_a_toy_problem(model_dir, monkeypatch, capsys):
    def fake_load_dataset(spec, split, **_):
        return two_tone(40 if split == "train" else 10, seed=int(split == "train"))

    monkeypatch.setattr("vitkit.data.load_dataset", fake_load_dataset)
    assert main(["eval", str(model_dir), "--data", "toy", "--knn", "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "k-NN (k=5, T=0.07) on 40 train images' features: 10 images, top-1 100.00%" in out
    report = json.loads((model_dir / "eval" / "knn" / "eval.json").read_text())
    assert report["top1"] == 1.0 and report["bank_images"] == 40 and report["k"] == 5
    assert report["confusion"] == [[5, 0], [0, 5]]
    assert not (model_dir / "eval" / "eval.json").exists()  # the head's report is its own

    for refused in (["--split", "train"], ["--precision", "bf16"], ["--temperature", "0"]):
        assert main(["eval", str(model_dir), "--data", "toy", "--knn", *refused]) == 2
        assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_knn_on_fashion_mnist_features(tmp_path, monkeypatch, capsys):
    """The shipped model's features: DINO's k-NN against the first 2,000 training images
    scores the first 500 test images 94.2% top-1, 98.6% top-5 (bench/knn_accuracy.py: 94.0%
    on all 10,000 against all 60,000, as the model's own head)."""
    load_fashion_mnist("test")  # skips where the dataset is not installed
    sizes = {"train": 2000, "test": 500}

    def first_images(spec, split, **kwargs):
        ds = load_dataset(spec, split, **kwargs)
        return ds.subset(torch.arange(sizes[split]))

    monkeypatch.setattr("vitkit.data.load_dataset", first_images)
    argv = ["eval", "fashion-mnist", "--data", "fashion-mnist", "--knn", "--json"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 500 and report["bank_images"] == 2000
    assert report["k"] == 20 and report["temperature"] == 0.07
    assert report["top1"] >= 0.91 and report["top5"] >= 0.96
