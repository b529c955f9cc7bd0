"""vitkit.optimize: each precision gives fp32's predictions on real data, and "auto" chooses
only what the hardware runs fast."""

import pytest
import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

import vitkit
from tests.fashion import load_fashion_mnist
from vitkit import runtime
from vitkit.data.dataset import CALIBRATION_IMAGES, calibration_sample
from vitkit.data.preprocess import preprocess
from vitkit.model import encoder
from vitkit.rundir import CALIBRATION_FILE
from vitkit.weights import CheckpointError, load_model, save_model


@pytest.fixture(scope="module")
def fashion():
    """The shipped model and 1,000 Fashion-MNIST test images, normalised, with labels."""
    test = load_fashion_mnist("test")
    model = vitkit.load_model("fashion-mnist")
    sub = test.subset(torch.arange(1000))
    return model, preprocess(sub.images, model.config), sub.labels


def _agreement(model, fast, x, labels):
    with torch.inference_mode():
        ref, out = model(x), fast(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    acc_ref = (ref.argmax(1) == labels).float().mean().item()
    acc = (out.argmax(1) == labels).float().mean().item()
    return agree, acc - acc_ref, (out.softmax(1) - ref.softmax(1)).abs().max().item()


def test_fp32_is_the_model_itself(fashion):
    model, x, _ = fashion
    fast = vitkit.optimize(model, "fp32")
    assert fast.precision == "fp32" and fast.labels == model.labels
    with torch.inference_mode():
        assert torch.equal(fast(x[:64]), model(x[:64]))


@pytest.mark.slow
def test_bf16_keeps_predictions(fashion):
    model, x, labels = fashion
    fast = vitkit.optimize(model, "bf16")
    assert next(model.parameters()).dtype == torch.float32  # the source model is untouched
    agree, delta, prob = _agreement(model, fast, x, labels)
    assert agree >= 0.99 and abs(delta) <= 0.005 and prob < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_int8_keeps_predictions_at_any_batch_size(fashion, backend, monkeypatch):
    if backend == "onednn" and runtime.int8_backend() != "onednn":
        pytest.skip("no int8 dot products here: PyTorch's int8 is slower than fp32")
    if backend == "onnxruntime":  # what a CPU with AVX2 but no VNNI runs
        monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    model, x, labels = fashion
    fast = vitkit.optimize(model, "int8")  # oneDNN's calibrates on the model's images
    assert fast.precision == "int8" and fast.backend == backend and fast.compile_seconds > 0
    agree, delta, prob = _agreement(model, fast, x[:256], labels[:256])
    assert agree >= 0.98 and abs(delta) <= 0.01 and prob < 0.2
    # Batches are padded to compiled sizes: 3 images give what they give one at a time.
    with torch.inference_mode():
        three = fast(x[:3])
        one_by_one = torch.cat([fast(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(three, one_by_one, atol=1e-4, rtol=0)


def test_auto_chooses_only_fast_and_usable_modes(monkeypatch):
    model = vitkit.create_model("Ti/7@28")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"sse4_2"}))
    assert runtime.fast_precisions() == [] and vitkit.optimize(model).precision == "fp32"
    # AVX2 without VNNI: int8 by ONNX Runtime, when enough images repay exporting the model.
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert runtime.fast_precisions() == ["int8"] and runtime.int8_backend() == "onnxruntime"
    assert vitkit.optimize(model, num_images=10).precision == "fp32"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_vnni"}))
    assert runtime.fast_precisions() == ["int8", "bf16"]
    # No calibration images (an untrained model), or too few images to repay compiling: bf16.
    assert runtime.resolve_precision("auto", allow_int8=False) == "bf16"
    assert vitkit.optimize(model).precision == "bf16"
    model.calibration = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    assert vitkit.optimize(model, num_images=10).precision == "bf16"
    assert runtime.resolve_precision("auto", allow_int8=True) == "int8"


def test_bad_precisions_are_rejected(monkeypatch):
    model = vitkit.create_model("Ti/7@28")
    with pytest.raises(ValueError, match="precision must be one of"):
        vitkit.optimize(model, "fp16")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    with pytest.raises(ValueError, match="int8 needs calibration images"):
        vitkit.optimize(model, "int8")
    with pytest.raises(TypeError, match="takes a vitkit ViT"):
        vitkit.optimize(torch.nn.Linear(2, 2))


def test_calibration_images_travel_with_the_model(tmp_path):
    model = vitkit.create_model("Ti/7@28")
    images = torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8)
    model.calibration = calibration_sample(images, seed=3)
    assert model.calibration.shape == (CALIBRATION_IMAGES, 1, 28, 28)
    assert torch.equal(model.calibration, calibration_sample(images, seed=3))
    save_model(model, tmp_path)
    assert torch.equal(load_model(tmp_path).calibration, model.calibration)
    # Large images: about CALIBRATION_BYTES of them, never fewer than 16.
    assert len(calibration_sample(torch.zeros(100, 3, 224, 224, dtype=torch.uint8))) == 53
    assert len(calibration_sample(torch.zeros(100, 3, 512, 512, dtype=torch.uint8))) == 16
    save_file({"images": torch.zeros(4, 3, 28, 28, dtype=torch.uint8)}, tmp_path / CALIBRATION_FILE)
    with pytest.raises(CheckpointError, match="for a 1-channel model"):
        load_model(tmp_path)
    (tmp_path / CALIBRATION_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(tmp_path)


class _Calls(TorchFunctionMode):
    """Records the torch functions a block of code calls."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_attention_path_follows_the_cpu_with_the_same_maths(amx, monkeypatch):
    """bf16 attention on a CPU: plain matmuls + softmax, except for inference on AMX, where
    the fused kernel runs on the bf16 tiles (its backward is slower, so training keeps the
    matmuls there too)."""
    monkeypatch.setattr(encoder, "amx_tiles", lambda: amx)
    torch.manual_seed(0)
    attn = vitkit.create_model("Ti/7@28").blocks[0].attn.eval()
    x = torch.randn(4, 17, 192)
    with torch.inference_mode():
        with _Calls() as fused:
            ref, _ = attn(x)
        attn.compute_dtype = torch.bfloat16  # as inside an int8 model
        with _Calls() as inferred:
            mixed, _ = attn(x)
    with _Calls() as trained:
        attn(x.requires_grad_())
    assert "scaled_dot_product_attention" in fused.names
    assert ("scaled_dot_product_attention" in inferred.names) == amx
    assert ("softmax" in inferred.names) != amx
    assert "softmax" in trained.names and "scaled_dot_product_attention" not in trained.names
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, ref, atol=2e-2, rtol=2e-2)
