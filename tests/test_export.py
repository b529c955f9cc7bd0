"""ONNX export: parity with PyTorch on real images, batch sizes, metadata, int8, the command."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from tests.fashion import load_fashion_mnist
from vitkit import create_model, load_model, save_model
from vitkit.cli.export import add_export_command
from vitkit.data.preprocess import preprocess
from vitkit.export.onnx import (
    check_onnx,
    compare_precisions,
    export_onnx,
    onnx_session,
    quantize_onnx_int8,
    read_metadata,
    run_onnx,
)

LABELS = [f"c{i}" for i in range(10)]


def small_model(**overrides):
    model = create_model("Ti/4@28", width=64, depth=2, heads=2, seed=0, **overrides)
    # The initial zero head is constant; its own generator keeps the weights independent of
    # which tests ran before.
    torch.nn.init.normal_(model.head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    model.labels = LABELS
    return model.eval()


@pytest.fixture(scope="module")
def fashion():
    return load_fashion_mnist("test")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small model and its dynamic-batch fp32 and int8 exports, shared by several tests."""
    model = small_model()
    folder = tmp_path_factory.mktemp("export")
    fp32 = export_onnx(model, folder / "model.onnx", dynamic_batch=True)
    return model, fp32, quantize_onnx_int8(fp32, folder / "model.int8.onnx")


@pytest.mark.slow
def test_parity_on_real_images_and_any_batch_size(exported, fashion):
    model, fp32, _ = exported
    x = preprocess(fashion.images[:256], model.config)
    parity = check_onnx(model, fp32, x)
    assert parity.max_abs_diff <= 1e-4 and parity.top1_agreement == 1.0
    assert parity.num_inputs == 256
    session = onnx_session(fp32)
    assert session.get_inputs()[0].shape[0] == "batch"
    with torch.no_grad():
        for n in (1, 5):
            got = torch.from_numpy(session.run(None, {"images": x[:n].numpy()})[0])
            assert got.shape == (n, 10)
            torch.testing.assert_close(got, model(x[:n]), rtol=0, atol=1e-4)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model.int8.onnx", "model.onnx"]


@pytest.mark.slow
def test_metadata_round_trips(exported):
    model, fp32, int8 = exported
    for path in (fp32, int8):
        meta = read_metadata(path)
        assert meta["config"] == model.config
        assert meta["labels"] == LABELS
        assert meta["preprocessing"] | {"normalize": None} == {
            "image_size": 28,
            "in_channels": 1,
            "mean": [0.5],
            "std": [0.5],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "normalize": None,
        }
    assert read_metadata(fp32)["quantization"] is None
    assert read_metadata(int8)["quantization"]["weights"] == "int8"


@pytest.mark.slow
def test_int8_file_is_smaller_and_close(exported, fashion):
    model, fp32, int8 = exported
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    # An untrained model's logits are near ties, so its top-1 says little about int8; the
    # shipped model's test below checks agreement.
    parity = check_onnx(model, int8, preprocess(fashion.images[:300], model.config))
    assert 0 < parity.max_abs_diff < 0.1


@pytest.mark.slow
def test_compare_precisions(exported, fashion):
    model, fp32, int8 = exported
    subset = fashion.subset(torch.arange(200))
    scores = compare_precisions(model, subset, {"ONNX fp32": fp32, "ONNX int8": int8})
    by_name = {s.name: s for s in scores}
    assert list(by_name) == ["PyTorch fp32", "PyTorch bf16", "ONNX fp32", "ONNX int8"]
    assert by_name["PyTorch fp32"].max_abs_diff == 0.0
    assert by_name["ONNX fp32"].max_abs_diff <= 1e-4
    assert by_name["ONNX fp32"].top1 == by_name["PyTorch fp32"].top1
    assert 0 < by_name["PyTorch bf16"].max_abs_diff < 0.1
    assert all(0.0 <= s.top1 <= 1.0 and s.top1_agreement >= 0.9 for s in scores)


@pytest.mark.slow
def test_hybrid_model_exports(tmp_path, fashion):
    model = small_model(resnet_layers=(1,), resnet_width=32, resnet_stem="small", patch_size=4)
    for norm in (m for name, m in model.named_modules() if name.endswith("norm3")):
        torch.nn.init.normal_(norm.weight)  # zero at init: the residual block would be a no-op
    path = export_onnx(model, tmp_path / "hybrid.onnx", dynamic_batch=True)
    parity = check_onnx(model, path, preprocess(fashion.images[:64], model.config))
    assert parity.max_abs_diff <= 1e-4 and parity.top1_agreement == 1.0
    assert read_metadata(path)["config"].resnet_layers == (1,)


@pytest.mark.slow
def test_shipped_model_exports_with_int8(tmp_path, fashion):
    model = vitkit.load_model("fashion-mnist")
    fp32 = export_onnx(model, tmp_path / "fm.onnx", dynamic_batch=True)
    int8 = quantize_onnx_int8(fp32, tmp_path / "fm.int8.onnx")
    x = preprocess(fashion.images[:400], model.config)
    assert check_onnx(model, fp32, x).max_abs_diff <= 1e-4
    assert check_onnx(model, int8, x).top1_agreement >= 0.95
    logits = run_onnx(onnx_session(int8), x)
    assert (logits.argmax(-1) == fashion.labels[:400]).float().mean() > 0.85


def _run(argv):
    parser = argparse.ArgumentParser(prog="vitkit")
    add_export_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.slow
def test_export_command(tmp_path, fashion, capsys):
    model_dir = save_model(small_model(), tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(fashion.images[i, 0].numpy(), mode="L").save(images / f"{i}.png")
    # A larger colour image: resized and converted like any input to `vitkit predict`.
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(colour, "RGB").save(images / "colour.png")

    assert _run(["export", str(model_dir), "--int8", "--check", str(images)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {model_dir / 'model.onnx'}" in out
    assert f"wrote {model_dir / 'model.int8.onnx'}" in out
    assert "ONNX fp32 vs PyTorch on 5 given image(s): max |logit diff|" in out
    assert "ONNX int8 vs PyTorch on 5 given image(s)" in out
    # A fixed batch of 1 by default; run_onnx feeds such a file one image at a time.
    session = onnx_session(model_dir / "model.onnx")
    assert session.get_inputs()[0].shape == [1, 1, 28, 28]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = load_model(model_dir)(x)
    torch.testing.assert_close(run_onnx(session, x), expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_export_command_checks_a_run_on_its_own_data(tmp_path, fashion, capsys):
    model_dir = save_model(small_model(), tmp_path / "run")
    (model_dir / "train.json").write_text(json.dumps({"data": "fashion-mnist"}))
    out = tmp_path / "out" / "m.onnx"
    assert _run(["export", str(model_dir), "--out", str(out), "--dynamic-batch"]) == 0
    assert "ONNX fp32 vs PyTorch on 64 held-out fashion-mnist images" in capsys.readouterr().out
    assert out.is_file()


def test_export_command_errors(tmp_path, capsys):
    model_dir = save_model(small_model(), tmp_path / "model")
    (tmp_path / "file").write_text("")
    cases = [
        (["export", str(tmp_path / "missing")], "not a model directory"),
        (["export", str(model_dir), "--out", str(tmp_path / "file" / "m.onnx")], "cannot write"),
        (["export", str(model_dir), "--out", str(tmp_path)], "is a directory"),
        (["export", str(model_dir), "--check", str(tmp_path / "none.png")], "cannot read image"),
        (["export", str(model_dir), "--check", str(model_dir)], "no image files"),
    ]
    for argv, message in cases:
        assert _run(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(model_dir.glob("*.onnx"))
