"""`vitkit inspect`: attention distance and entropy on cases with known answers (attention on
the diagonal, uniform attention, computed apart by brute force), position embeddings set to
known vectors, filter grids, principal components, and the command end to end."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit import create_model, save_model
from vitkit.cli import main
from vitkit.infer.inspect import (
    FIGURES,
    REPORT,
    head_statistics,
    inspect_model,
    position_similarity,
    principal_components,
    tile,
)


def brute_force_mean_distance(grid: int, pixels: float) -> float:
    """The mean distance between the centres of two patches drawn alike (itself included)."""
    cells = list(itertools.product(range(grid), repeat=2))
    total = sum(math.dist(a, b) for a, b in itertools.product(cells, repeat=2))
    return pixels * total / len(cells) ** 2


def small(**overrides):
    config = {"width": 64, "heads": 2, "depth": 2, **overrides}
    return create_model("Ti/4@28", seed=0, **config).eval()


def uniform_attention(model):
    """`model` with every head's queries and keys zero: each attends to all tokens alike."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.config.width] = 0
            block.attn.qkv.bias[: 2 * model.config.width] = 0
    return model


def diagonal_attention():
    """A model whose every head attends (all but e^-72 of its weight) to the query itself.

    Every weight is zero but the LayerNorm gains, the position embeddings and the query and
    key projections (q = k = 3 LN(x)). The tokens are then their position embeddings, chosen
    orthonormal and zero-mean within each head's half of the channels, so that a token's
    score with itself is 72 and with any other token 0, in every layer alike.
    """
    model = small(width=128)
    half, tokens = 64, 1 + 49
    a = torch.randn(half, tokens, dtype=torch.float64)
    a, _ = torch.linalg.qr(a - a.mean(dim=0))  # orthonormal columns, each of zero mean
    u = torch.cat([a, a]).T.float() / math.sqrt(2)  # (tokens, 128), the same in both heads
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
        model.pos_embed[0] = u
        for block in model.blocks:
            block.attn.qkv.weight[:128] = 3 * torch.eye(128)
            block.attn.qkv.weight[128:256] = 3 * torch.eye(128)
    return model


# -- the statistics on attention tensors made by hand ---------------------------------------
def test_diagonal_attention_has_no_distance_nor_entropy():
    grid, prefix = 5, 2
    tokens = prefix + grid * grid
    attention = torch.zeros(2, 3, tokens, tokens)
    # Each patch query puts 0.3 on the prefix tokens and the rest on itself.
    attention[..., prefix:, :prefix] = 0.15
    idx = torch.arange(prefix, tokens)
    attention[..., idx, idx] = 0.7
    distance, entropy, on_prefix = head_statistics(attention, prefix, patch_pixels=16)
    assert distance.shape == entropy.shape == on_prefix.shape == (2, 3)
    torch.testing.assert_close(distance, torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(entropy, torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(on_prefix, torch.full((2, 3), 0.3, dtype=torch.float64))


@pytest.mark.parametrize(("grid", "prefix", "pixels"), [(4, 1, 8), (5, 0, 16), (3, 3, 7)])
def test_uniform_attention_has_the_grids_mean_distance_and_log_n_entropy(grid, prefix, pixels):
    tokens = prefix + grid * grid
    attention = torch.full((1, 2, tokens, tokens), 1 / tokens)
    distance, entropy, on_prefix = head_statistics(attention, prefix, pixels)
    want = brute_force_mean_distance(grid, pixels)
    torch.testing.assert_close(distance, torch.full_like(distance, want))
    torch.testing.assert_close(entropy, torch.full_like(entropy, math.log(grid * grid)))
    torch.testing.assert_close(on_prefix, torch.full_like(on_prefix, prefix / tokens))


def test_attending_one_patch_to_the_right_is_one_patch_away():
    grid, pixels = 4, 10
    n = grid * grid
    attention = torch.zeros(1, 1, n, n)
    for q in range(n):  # the next patch in its row; the last column attends to itself
        row, col = divmod(q, grid)
        attention[0, 0, q, row * grid + min(col + 1, grid - 1)] = 1.0
    distance, entropy, _ = head_statistics(attention, 0, pixels)
    assert distance.item() == pytest.approx(pixels * (grid - 1) / grid)
    assert entropy.item() == pytest.approx(0.0)


# -- the statistics of a model, end to end ----------------------------------------------------
def test_a_model_attending_to_itself_has_mean_distance_zero():
    model = diagonal_attention()
    result = inspect_model(model, torch.rand(3, 1, 28, 28), progress=False)
    assert result.num_images == 3 and result.distance.shape == (2, 2)
    np.testing.assert_allclose(result.distance, 0.0, atol=1e-6)
    np.testing.assert_allclose(result.entropy, 0.0, atol=1e-6)
    np.testing.assert_allclose(result.prefix_attention, 0.0, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "prefix"),
    [
        ({}, 1),
        ({"num_registers": 2}, 3),
        ({"distilled": True}, 2),
        ({"pool": "mean", "class_token": False}, 0),
    ],
)
def test_a_model_attending_everywhere_alike(overrides, prefix):
    model = uniform_attention(small(**overrides))
    result = inspect_model(model, torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8))
    assert result.patch_pixels == 4 and result.grid == 7
    assert result.num_prefix_tokens == prefix
    want = brute_force_mean_distance(7, 4)
    np.testing.assert_allclose(result.distance, want, rtol=1e-5)
    assert result.uniform_distance == pytest.approx(want)
    np.testing.assert_allclose(result.entropy, math.log(49), rtol=1e-5)
    assert result.max_entropy == pytest.approx(math.log(49))
    np.testing.assert_allclose(result.prefix_attention, prefix / (prefix + 49), rtol=1e-5)


def test_a_hybrids_patches_are_its_token_stride_wide():
    # Two stages (stride 2) and 2-pixel patches: each token covers 4 x 4 pixels, 7 x 7 tokens.
    overrides = {"resnet_layers": (1, 1), "resnet_width": 32, "resnet_stem": "small"}
    model = uniform_attention(small(patch_size=2, **overrides))
    result = inspect_model(model, torch.rand(2, 1, 28, 28), progress=False)
    assert result.patch_pixels == 28 // 7 == 4 and result.grid == 7
    np.testing.assert_allclose(result.distance, brute_force_mean_distance(7, 4), rtol=1e-5)
    # The filters that see the pixels are the CNN's first convolution's, standardised.
    assert result.filter_source == "patch_embed.backbone.stem.conv"
    assert result.filters.shape == (32, 1, 3, 3)
    assert result.components.shape == (9, 1, 3, 3)


def test_a_sample_of_the_images_and_image_files(tmp_path):
    model = uniform_attention(small())
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    assert inspect_model(model, images, num_images=4).num_images == 4
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40, 30), 40 * i, dtype=np.uint8)).save(paths[-1])
    result = inspect_model(model, paths, num_images=10)
    assert result.num_images == 3
    np.testing.assert_allclose(result.distance, brute_force_mean_distance(7, 4), rtol=1e-5)
    with pytest.raises(ValueError, match="at least 1"):
        inspect_model(model, images, num_images=0)


# -- position embeddings and filters ----------------------------------------------------------
def test_position_similarity_of_known_embeddings():
    model = small(distilled=True)  # two prefix tokens with position embeddings
    v = torch.randn(64)
    with torch.no_grad():
        model.pos_embed[0, :2] = -v  # left out: they would make the similarities -1
        model.pos_embed[0, 2:] = v
    same = position_similarity(model)
    assert same.shape == (7, 7, 7, 7)
    torch.testing.assert_close(same, torch.ones_like(same))
    resampled = position_similarity(model, grid=10)
    assert resampled.shape == (10, 10, 10, 10)
    torch.testing.assert_close(resampled, torch.ones_like(resampled))

    q, _ = torch.linalg.qr(torch.randn(64, 49))
    with torch.no_grad():
        model.pos_embed[0, 2:] = q.T
    orthogonal = position_similarity(model).reshape(49, 49)
    torch.testing.assert_close(orthogonal, torch.eye(49), atol=1e-5, rtol=0)


def test_filters_and_their_grid():
    result = inspect_model(small())
    assert result.filter_source == "patch_embed.proj"
    assert result.filters.shape == (64, 1, 4, 4)
    assert result.filters.min() == 0.0 and result.filters.max() == 1.0
    # Each filter is scaled to [0, 1] on its own.
    flat = result.filters.reshape(64, -1)
    np.testing.assert_allclose(flat.min(axis=1), 0.0)
    np.testing.assert_allclose(flat.max(axis=1), 1.0)
    # 4 x 4 x 1 filters have 16 principal components, which hold all of their variance.
    assert result.components.shape == (16, 1, 4, 4)
    assert result.component_variance.sum() == pytest.approx(1.0, abs=1e-5)
    assert tile(result.filters[:, 0]).shape == (8 * 5 - 1, 8 * 5 - 1)
    assert tile(np.zeros((10, 3, 3, 3)), cols=4).shape == (3 * 4 - 1, 4 * 4 - 1, 3)
    assert result.distance is None and "no images" in result.summary()
    assert inspect_model(small(in_channels=3)).filters.shape == (64, 3, 4, 4)


def test_principal_components_of_filters_along_one_direction():
    v = torch.tensor([0.1, -0.2, 0.9, 0.3, 0.0, -0.4, 0.2, 0.1, 0.5])  # largest entry positive
    scales = torch.tensor([1.0, -2.0, 0.5, 3.0, 4.0])
    filters = (scales[:, None] * v).reshape(5, 1, 3, 3)
    components, share = principal_components(filters)
    assert components.shape == (5, 1, 3, 3)  # 5 filters: at most 5 components
    assert share[0].item() == pytest.approx(1.0)
    torch.testing.assert_close(components[0].flatten(), v / v.norm())


# -- the command --------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    """A small model trained (as train.json says) on an image folder of four pictures."""
    folder = tmp_path / "pictures"
    for split, name, value in itertools.product(("train", "test"), ("a", "b"), (30, 220)):
        (folder / split / name).mkdir(parents=True, exist_ok=True)
        picture = np.full((36, 36), value, dtype=np.uint8)
        Image.fromarray(picture).save(folder / split / name / f"{value}.png")
    directory = save_model(small(), tmp_path / "model", labels=[str(i) for i in range(10)])
    (directory / "train.json").write_text(json.dumps({"data": str(folder)}))
    return directory


def test_inspect_command_writes_the_figures_and_numbers(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", str(model_dir), "--out", str(out), "--resample-grid", "9"]) == 0
    for name in FIGURES:
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 300
    report = json.loads((out / REPORT).read_text())
    assert report["num_images"] == 4 and report["grid"] == 7 and report["patch_pixels"] == 4
    assert report["resampled_grid"] == 9
    assert np.array(report["attention"]["distance_px"]).shape == (2, 2)
    assert np.array(report["position_similarity"]).shape == (7, 7, 7, 7)
    captured = capsys.readouterr()
    assert "the model's own dataset" in captured.err
    assert "layer 1:" in captured.out and f"to {out}" in captured.out


def test_inspect_command_errors_are_one_line(model_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "not a model directory" in err
    (model_dir / "train.json").unlink()
    assert main(["inspect", str(model_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --data" in err
    assert main(["inspect", str(model_dir), "--data", str(tmp_path / "none.csv")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()
