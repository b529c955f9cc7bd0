"""`vitkit embed --text` and `vitkit search`: a CLIP's texts embedded beside its images, an
image query finding itself, a text query finding the images it describes on a toy CLIP trained
here, and hostile index files refused by name."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.clip_toy import SHADES, shades, small_tower, train_toy_clip
from vitkit import create_model, save_model
from vitkit.cli import main
from vitkit.data.preprocess import centre_crop, load_image, preprocess
from vitkit.infer.embed import (
    CLIP_SPACE,
    MAX_TEXT_CHARS,
    POOLED,
    embed_images,
    embed_texts,
    model_fingerprint,
)
from vitkit.infer.search import IndexFileError, load_index, read_index_file, search
from vitkit.infer.zero_shot import load_tokenizer
from vitkit.weights.clip import load_clip

PER_SHADE = 4


@pytest.fixture(scope="module")
def lit_dir(tmp_path_factory):
    """The toy LiT (tests/clip_toy.py), trained for fewer steps: retrieval needs no more."""
    out = tmp_path_factory.mktemp("lit")
    train_toy_clip(out, steps=40)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """PER_SHADE unseen images of each shade, named after it."""
    folder = tmp_path_factory.mktemp("photos")
    data = shades(3 * PER_SHADE, seed=7)
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        Image.fromarray(image[0].numpy()).save(folder / f"{SHADES[label]}_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def index(lit_dir, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "photos.safetensors"
    argv = ["embed", str(lit_dir), str(photos), "--out", str(out), "--text", "a dark square."]
    assert main([*argv, "--text", "a bright picture."]) == 0
    return out


def _search(capsys, *argv):
    capsys.readouterr()  # what came before
    code = main(["search", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    return code, rows, captured.err


def _shade(path: str) -> str:
    return os.path.basename(path).split("_")[0]


# -- vitkit embed --text ------------------------------------------------------------------


def test_embed_writes_clip_image_and_text_embeddings(lit_dir, photos, index, tmp_path, capsys):
    tensors = load_file(index)
    with safe_open(index, framework="pt") as f:
        meta = f.metadata()
    names = json.loads(meta["names"])
    assert names == sorted(str(p) for p in photos.iterdir())
    assert json.loads(meta["texts"]) == ["a dark square.", "a bright picture."]
    assert meta["embedding"] == CLIP_SPACE and meta["model_dir"] == str(lit_dir.resolve())
    clip, tokenizer_file = load_clip(lit_dir)
    tokenizer = load_tokenizer(clip, tokenizer_file)
    e = clip.text.config.embed_dim
    assert tensors["features"].shape == (3 * PER_SHADE, e)
    assert tensors["text_features"].shape == (2, e)
    for name in ("features", "text_features"):
        norms = tensors[name].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    # The images' rows are CLIP's image embeddings, the texts' its text embeddings.
    c = clip.visual.config
    decoded = torch.stack(
        [load_image(n, 1, 28, c.interpolation, crop=centre_crop(c.crop_pct)) for n in names]
    )
    with torch.no_grad():
        images = clip.encode_image(preprocess(decoded, c))
        texts = clip.encode_text(tokenizer(["a dark square.", "a bright picture."]))
    torch.testing.assert_close(tensors["features"], images, atol=1e-5, rtol=0)
    torch.testing.assert_close(tensors["text_features"], texts, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        embed_texts(clip, tokenizer, ["a dark square.", "a bright picture."]), texts
    )

    # Texts alone, from a file too (blank lines skipped); --pooled keeps the head's input.
    lines = tmp_path / "texts.txt"
    lines.write_text("a grey square.\n\n  a dark picture. \n")
    out = tmp_path / "texts.safetensors"
    argv = ["embed", str(lit_dir), "--text", "x", "--text-file", str(lines), "--out", str(out)]
    assert main(argv) == 0
    assert "text_features 3 x" in capsys.readouterr().out
    assert set(load_file(out)) == {"text_features"}
    with safe_open(out, framework="pt") as f:
        assert json.loads(f.metadata()["texts"]) == ["x", "a grey square.", "a dark picture."]
    argv = ["embed", str(lit_dir), str(photos), "--pooled", "--out", str(out)]
    assert main(argv) == 0
    pooled = load_file(out)["features"]
    assert pooled.shape == (3 * PER_SHADE, c.width)
    torch.testing.assert_close(pooled, embed_images(clip.visual, decoded), atol=1e-5, rtol=0)
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["embedding"] == POOLED


def test_embed_refuses_texts_it_cannot_embed(lit_dir, photos, tmp_path, capsys):
    vit = save_model(small_tower(), tmp_path / "vit")
    out = tmp_path / "e.safetensors"
    long = "a" * (MAX_TEXT_CHARS + 1)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    cases = [
        (["embed", str(vit), str(photos), "--text", "a cat"], "not a CLIP (no text tower)"),
        (["embed", str(lit_dir), "--text", "a", "--pooled"], "--pooled"),
        (["embed", str(lit_dir), "--text", long], "at most 2,000 characters"),
        (["embed", str(lit_dir), "--text-file", str(tmp_path / "none.txt")], "none.txt"),
        (["embed", str(lit_dir), "--text-file", str(tmp_path / "bin.txt")], "not a UTF-8 text"),
        (["embed", str(lit_dir)], "nothing to embed"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)
    assert not out.exists()


# -- vitkit search ------------------------------------------------------------------------


def test_an_image_finds_itself_first(index, photos, capsys):
    for name in ("dark_00.png", "bright_05.png"):
        query = photos / name
        code, rows, _ = _search(capsys, index, query, "--top-k", "3")
        assert code == 0 and len(rows) == 3
        assert rows[0]["path"] == str(query) and rows[0]["rank"] == 1
        assert rows[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
        assert [r["rank"] for r in rows] == [1, 2, 3]
        assert rows[0]["similarity"] >= rows[1]["similarity"] >= rows[2]["similarity"]


@pytest.mark.parametrize("shade", SHADES)
def test_a_text_finds_the_images_it_describes(index, capsys, shade):
    code, rows, _ = _search(capsys, index, f"a photo of a {shade} square.", "--top-k", "4")
    assert code == 0
    assert [_shade(r["path"]) for r in rows] == [shade] * PER_SHADE


def test_text_output_and_k_beyond_the_index(index, photos, capsys):
    assert main(["search", str(index), str(photos / "grey_01.png"), "--top-k", "1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * PER_SHADE
    assert lines[0] == f"1.0000  {photos / 'grey_01.png'}"
    sims = [float(line.split()[0]) for line in lines]
    assert sims == sorted(sims, reverse=True)
    # --text reads a file's name as text; a missing image name is read as text, with a note.
    code, rows, err = _search(capsys, index, photos / "grey_01.png", "--text", "--top-k", "1")
    assert code == 0 and rows[0]["similarity"] < 0.999
    code, rows, err = _search(capsys, index, photos / "gone.png", "--top-k", "1")
    assert code == 0 and "searching for it as text" in err


def test_a_folder_of_index_files_is_searched_as_one(lit_dir, photos, index, tmp_path, capsys):
    folder = tmp_path / "indexes"
    folder.mkdir()
    files = sorted(photos.iterdir())
    for part, chunk in (("a", files[:5]), ("b", files[5:])):
        argv = [
            "embed",
            str(lit_dir),
            *map(str, chunk),
            "--out",
            str(folder / f"{part}.safetensors"),
        ]
        assert main(argv) == 0
    (folder / "notes.txt").write_text("not an index")  # not a .safetensors: ignored
    capsys.readouterr()
    query = "a photo of a grey square."
    _, whole, _ = _search(capsys, index, query, "--top-k", "20")
    code, parts, _ = _search(capsys, folder, query, "--top-k", "20")
    assert code == 0 and [r["path"] for r in parts] == [r["path"] for r in whole]
    for a, b in zip(parts, whole, strict=True):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-6)
    assert len(load_index(folder)) == 3 * PER_SHADE


def test_text_queries_need_a_clip_and_its_embeddings(lit_dir, photos, tmp_path, capsys):
    vit = save_model(small_tower(), tmp_path / "vit")
    plain = tmp_path / "plain.safetensors"
    assert main(["embed", str(vit), str(photos), "--out", str(plain)]) == 0
    code, rows, _ = _search(capsys, plain, photos / "dark_00.png", "--top-k", "1")
    assert code == 0 and rows[0]["path"] == str(photos / "dark_00.png")
    code, _, err = _search(capsys, plain, "a dark square")
    assert code == 2 and "not a CLIP (no text tower)" in err and "\n" not in err.strip()
    code, _, err = _search(capsys, plain, photos / "dark_00.png", "--text")
    assert code == 2 and "not a CLIP (no text tower): --text needs one" in err

    pooled = tmp_path / "pooled.safetensors"
    assert main(["embed", str(lit_dir), str(photos), "--pooled", "--out", str(pooled)]) == 0
    code, _, err = _search(capsys, pooled, "a dark square")
    assert code == 2 and "pooled image features" in err and str(pooled) in err
    code, rows, _ = _search(capsys, pooled, photos / "dark_00.png", "--top-k", "1")
    assert code == 0 and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-5)

    # Another model than the index's: refused by its size; an unreadable recorded model.
    code, _, err = _search(capsys, plain, photos / "dark_00.png", "--model", str(lit_dir))
    assert code == 2 and "not the model the index was embedded with" in err
    other = save_model(create_model("Ti/4@28", seed=1, width=32, heads=2, depth=2), tmp_path / "o")
    code, _, err = _search(capsys, plain, photos / "dark_00.png", "--model", str(other))
    assert code == 2 and "image weights differ" in err
    moved = tmp_path / "moved.safetensors"
    tensors = load_file(plain)
    with safe_open(plain, framework="pt") as f:
        meta = f.metadata() | {"model_dir": str(tmp_path / "gone")}
    save_file(tensors, moved, metadata=meta)
    code, _, err = _search(capsys, moved, photos / "dark_00.png")
    assert code == 2 and "pass --model" in err and str(moved) in err
    code, _, _ = _search(capsys, moved, photos / "dark_00.png", "--model", str(vit))
    assert code == 0
    code, _, err = _search(capsys, plain, photos / "dark_00.png", "--top-k", "0")
    assert code == 2 and "--top-k" in err


# -- hostile index files --------------------------------------------------------------------


def _raw(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _entry(dtype="F32", shape=(2, 4), offsets=(0, 32)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


NAMES2 = json.dumps(["a.png", "b.png"])
GOOD_META = {"names": NAMES2, "embedding": "clip", "model_dir": "/nowhere"}
DATA = struct.pack("<8f", *range(1, 9))


def _features_file(path, values: torch.Tensor, **meta) -> None:
    save_file({"features": values}, path, metadata={"names": NAMES2} | meta)


HOSTILE = {
    "garbage": lambda p: p.write_bytes(b"not a safetensors file at all"),
    "empty": lambda p: p.write_bytes(b""),
    "header past the end": lambda p: p.write_bytes(_raw({}, length=2**40)),
    "header not an object": lambda p: p.write_bytes(_raw([1, 2])),  # type: ignore[arg-type]
    "no features": lambda p: p.write_bytes(_raw({"__metadata__": GOOD_META})),
    "integer features": lambda p: p.write_bytes(
        _raw({"__metadata__": GOOD_META, "features": _entry("I32")}, DATA)
    ),
    "dtype not a string": lambda p: p.write_bytes(
        _raw({"__metadata__": GOOD_META, "features": _entry(["F32"])}, DATA)
    ),
    "a 3-D tensor": lambda p: p.write_bytes(
        _raw({"__metadata__": GOOD_META, "features": _entry(shape=(2, 2, 2))}, DATA)
    ),
    "2**40 rows": lambda p: p.write_bytes(
        _raw({"__metadata__": GOOD_META, "features": _entry(shape=(2**40, 4))}, DATA)
    ),
    "data past the end": lambda p: p.write_bytes(
        _raw({"__metadata__": GOOD_META, "features": _entry(offsets=(0, 32))}, DATA[:16])
    ),
    "names of another count": lambda p: _features_file(
        p, torch.ones(3, 4), embedding="clip", model_dir="/x"
    ),
    "names not JSON": lambda p: save_file(
        {"features": torch.ones(2, 4)}, p, metadata={"names": "[oops"}
    ),
    "names not strings": lambda p: save_file(
        {"features": torch.ones(2, 4)}, p, metadata={"names": "[1, 2]"}
    ),
    "metadata not strings": lambda p: p.write_bytes(
        _raw({"__metadata__": {"names": ["a", "b"]}, "features": _entry()}, DATA)
    ),
    "unknown embedding": lambda p: _features_file(p, torch.ones(2, 4), embedding="magic"),
    "NaN features": lambda p: _features_file(p, torch.full((2, 4), float("nan"))),
    "fingerprint not a digest": lambda p: _features_file(
        p, torch.ones(2, 4), model_fingerprint="\x1b[2J" * 40
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_index_files_are_refused_by_name(tmp_path, capsys, case):
    path = tmp_path / "index.safetensors"
    HOSTILE[case](path)
    with pytest.raises(IndexFileError) as caught:
        read_index_file(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    code, rows, err = _search(capsys, path, "a dark square")
    assert code == 2 and rows == []
    assert str(path) in err and len(err.strip().splitlines()) == 1, err


def test_odd_index_paths_are_refused_by_name(tmp_path, lit_dir, photos, capsys):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    empty = tmp_path / "empty"
    empty.mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _features_file(mixed / "a.safetensors", torch.ones(2, 4), embedding="clip", model_dir="/m1")
    _features_file(mixed / "b.safetensors", torch.ones(2, 4), embedding="clip", model_dir="/m2")
    cases = [
        (fifo, "not a regular file"),
        (tmp_path / "missing.safetensors", "missing.safetensors"),
        (empty, "no .safetensors embeddings files"),
        (mixed, "one model's embeddings"),
    ]
    for path, message in cases:
        code, _, err = _search(capsys, path, "a dark square")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert str(path.name) in err


def test_fingerprints_tell_models_apart(lit_dir):
    a, b = small_tower(), small_tower()
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(load_clip(lit_dir)[0].visual) != model_fingerprint(a)
    with torch.no_grad():
        b.head.bias[0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


# -- the ranking ----------------------------------------------------------------------------


def test_search_ranks_by_cosine():
    bank = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    sims, rows = search(bank, torch.tensor([5.0, 0.0]), 2)
    assert rows.tolist() == [0, 2]
    torch.testing.assert_close(sims, torch.tensor([1.0, 2**-0.5]))
    sims, rows = search(bank, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), 10)  # k beyond: all
    assert rows.shape == (2, 4) and rows[:, 0].tolist() == [1, 3]
    assert sims[1, -1] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="k must"):
        search(bank, torch.ones(2), 0)
    with pytest.raises(ValueError, match="2-dimensional"):
        search(bank, torch.ones(3), 1)
