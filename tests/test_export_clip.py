"""ONNX export of a CLIP's two towers: both files written by `vitkit export`, ONNX Runtime's
outputs equal to PyTorch's at batch sizes 1 and 3, padding after the end-of-text ignored, the
tokenizer carried in the text file, and the choice of towers."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers
import torch
import torch.nn.functional as F
from PIL import Image

from vitkit import create_model, save_model
from vitkit.cli import main
from vitkit.cli.export import PARITY_TOLERANCE
from vitkit.config import TextConfig, ViTConfig
from vitkit.data.preprocess import preprocess
from vitkit.data.text import Tokenizer, train_tokenizer
from vitkit.export.onnx import (
    TEXT_INPUT_NAME,
    TEXT_OUTPUT_NAME,
    check_text_onnx,
    export_text_onnx,
    onnx_session,
    read_text_metadata,
    run_onnx,
    run_text_onnx,
)
from vitkit.model.clip import CLIP
from vitkit.model.text import TextTransformer
from vitkit.model.vit import ViT
from vitkit.weights.clip import load_clip, save_clip

CAPTIONS = [
    f"a {shade} photo of a {thing}"
    for shade in ("dark", "grey", "bright", "red")
    for thing in ("cat", "dog", "square", "car")
]
TEXTS = ["a dark cat", "", "a bright photo of a red square on a grey car, twice over"]
CONTEXT = 12


def tiny_clip(tokenizer: Tokenizer) -> CLIP:
    vision = ViTConfig(image_size=28, patch_size=7, width=48, depth=1, heads=3, num_classes=16)
    text = TextConfig(
        vocab_size=tokenizer.vocab_size,
        context_length=CONTEXT,
        width=32,
        depth=2,
        heads=2,
        embed_dim=16,
        eot_id=tokenizer.eot_id,
    )
    torch.manual_seed(0)
    clip = CLIP(ViT(vision), TextTransformer(text))
    # The image tower's head starts at zero: a constant output would check nothing.
    torch.nn.init.normal_(clip.visual.head.weight, std=0.1)
    return clip.eval()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300)
    folder = tmp_path_factory.mktemp("clip")
    save_clip(tiny_clip(tokenizer), folder / "clip", tokenizer.to_json())
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    for i in range(3):
        pixels = rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(images / f"{i}.png")
    return folder / "clip", images


@pytest.fixture(scope="module")
def exported(clip_dir, tmp_path_factory):
    """`vitkit export` of the CLIP, both towers, any batch size, checked on images and texts."""
    model_dir, images = clip_dir
    out = tmp_path_factory.mktemp("onnx") / "clip.onnx"
    argv = ["export", str(model_dir), "--out", str(out), "--dynamic-batch"]
    code = main([*argv, "--check", str(images), "--check-text", "a cat", "--check-text", ""])
    assert code == 0
    return out, out.with_name("clip.text.onnx")


@pytest.mark.slow  # an ONNX export of both towers each: `make test` runs it
def test_both_towers_are_written_and_checked(clip_dir, tmp_path, capsys):
    model_dir, images = clip_dir
    argv = ["export", str(model_dir), "--out", str(tmp_path / "m.onnx"), "--check", str(images)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        f"wrote {tmp_path / 'm.onnx'}" in out
        and "image embeddings (batch, 16), unnormalised" in out
    )
    assert f"wrote {tmp_path / 'm.text.onnx'}" in out
    assert "ONNX fp32 vs PyTorch on 3 given image(s): max |embedding diff|" in out
    assert "ONNX text fp32 vs PyTorch on 8 sample texts, in one batch and one by one" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.text.onnx"]
    # Without --dynamic-batch the image file takes one image at a time; the text file any.
    assert onnx_session(tmp_path / "m.onnx").get_inputs()[0].shape[0] == 1
    assert onnx_session(tmp_path / "m.text.onnx").get_inputs()[0].shape[0] == "batch"


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_text_file_gives_the_text_towers_embeddings(clip_dir, exported, batch):
    clip, tokenizer_file = load_clip(clip_dir[0])
    tokenizer = Tokenizer.from_file(tokenizer_file, context_length=CONTEXT)
    session = onnx_session(exported[1])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == (TEXT_INPUT_NAME, ["batch", CONTEXT], "tensor(int64)")
    assert (outp.name, outp.shape) == (TEXT_OUTPUT_NAME, ["batch", 16])
    ids = tokenizer(TEXTS[:batch])
    got = run_text_onnx(session, ids)
    with torch.no_grad():
        raw, unit = clip.encode_text(ids, normalize=False), clip.encode_text(ids)
    assert got.shape == (batch, 16)
    # The file's output is the unnormalised embedding, as the image file's is.
    torch.testing.assert_close(got, raw, atol=PARITY_TOLERANCE, rtol=0)
    torch.testing.assert_close(F.normalize(got, dim=-1), unit, atol=PARITY_TOLERANCE, rtol=0)
    assert (raw.norm(dim=-1) - 1).abs().max() > 1e-2  # unnormalised indeed


@pytest.mark.slow  # shares an ONNX export of both towers (12 s): `make test` runs it
@pytest.mark.parametrize("batch", [1, 3])
def test_image_file_gives_the_image_towers_embeddings(clip_dir, exported, batch):
    clip, _ = load_clip(clip_dir[0])
    x = preprocess(torch.randint(0, 256, (batch, 3, 28, 28), dtype=torch.uint8), clip.visual.config)
    got = run_onnx(onnx_session(exported[0]), x)
    with torch.no_grad():
        raw, unit = clip.visual(x), clip.encode_image(x)
    assert got.shape == (batch, 16)
    torch.testing.assert_close(got, raw, atol=PARITY_TOLERANCE, rtol=0)
    torch.testing.assert_close(F.normalize(got, dim=-1), unit, atol=PARITY_TOLERANCE, rtol=0)


@pytest.mark.slow  # shares an ONNX export of both towers (12 s): `make test` runs it
def test_padding_after_the_end_of_text_changes_nothing(clip_dir, exported):
    _, tokenizer_file = load_clip(clip_dir[0])
    tokenizer = Tokenizer.from_file(tokenizer_file, context_length=CONTEXT)
    ids = tokenizer(TEXTS[:2])
    noisy = ids.clone()
    for row in noisy:
        end = int((row == tokenizer.eot_id).nonzero()[0])
        row[end + 1 :] = torch.randint(0, tokenizer.eot_id, (CONTEXT - end - 1,))
    assert not torch.equal(noisy, ids)
    session = onnx_session(exported[1])
    torch.testing.assert_close(
        run_text_onnx(session, noisy), run_text_onnx(session, ids), atol=1e-6, rtol=0
    )


@pytest.mark.slow  # shares an ONNX export of both towers (12 s): `make test` runs it
def test_text_file_carries_its_tokenizer(clip_dir, exported):
    clip, tokenizer_file = load_clip(clip_dir[0])
    meta = read_text_metadata(exported[1])
    assert meta["text_config"] == clip.text.config and meta["quantization"] is None
    assert meta["input"]["context_length"] == CONTEXT
    assert meta["input"]["eot_id"] == clip.text.config.eot_id
    carried = Tokenizer(tokenizers.Tokenizer.from_str(meta["tokenizer"]), CONTEXT)
    original = Tokenizer.from_file(tokenizer_file, context_length=CONTEXT)
    assert meta["input"]["sot_id"] == original.sot_id
    assert torch.equal(carried(TEXTS), original(TEXTS))


@pytest.mark.slow  # an ONNX export of both towers each: `make test` runs it
def test_check_text_onnx_sees_a_wrong_file(clip_dir, tmp_path):
    clip, tokenizer_file = load_clip(clip_dir[0])
    tokenizer = Tokenizer.from_file(tokenizer_file, context_length=CONTEXT)
    path = export_text_onnx(clip.text, tmp_path / "t.onnx", tokenizer)
    ids = tokenizer(TEXTS)
    parity = check_text_onnx(clip.text, path, ids)
    assert parity.max_abs_diff <= 1e-4 and parity.min_cosine > 0.9999 and parity.num_inputs == 3
    with torch.no_grad():
        clip.text.proj.weight.mul_(-1)
    assert check_text_onnx(clip.text, path, ids).min_cosine < 0


@pytest.mark.slow  # an ONNX export of both towers each: `make test` runs it
def test_tower_choice(clip_dir, tmp_path, capsys):
    model_dir, _ = clip_dir
    text_only = tmp_path / "t" / "words.onnx"
    assert main(["export", str(model_dir), "--tower", "text", "--out", str(text_only)]) == 0
    assert [p.name for p in text_only.parent.iterdir()] == ["words.onnx"]
    assert onnx_session(text_only).get_inputs()[0].name == TEXT_INPUT_NAME
    image_only = tmp_path / "i" / "m.onnx"
    argv = ["export", str(model_dir), "--tower", "image", "--out", str(image_only)]
    assert main(argv) == 0  # unchecked (no images given): said on stderr, not an error
    assert [p.name for p in image_only.parent.iterdir()] == ["m.onnx"]
    assert "not checked" in capsys.readouterr().err


@pytest.mark.slow  # an ONNX export of both towers each: `make test` runs it
def test_a_failed_text_check_fails_the_command(clip_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("vitkit.cli.export.PARITY_TOLERANCE", -1.0)
    out = tmp_path / "t.onnx"
    assert main(["export", str(clip_dir[0]), "--tower", "text", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{out} differs from the PyTorch text tower" in err and "\n" not in err


def test_refusals(clip_dir, tmp_path, capsys):
    vit = create_model("Ti/4@28", width=32, depth=1, heads=2, seed=0)
    vit_dir = save_model(vit, tmp_path / "vit")
    model_dir, images = clip_dir
    cases = [
        (["export", str(vit_dir), "--tower", "text"], "not a CLIP (no text tower)"),
        (["export", str(vit_dir), "--tower", "both"], "not a CLIP (no text tower)"),
        (["export", str(vit_dir), "--check-text", "a cat"], "--check-text"),
        (["export", str(model_dir), "--tower", "text", "--check", str(images)], "--check takes"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "x.onnx")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not list(tmp_path.glob("*.onnx"))
