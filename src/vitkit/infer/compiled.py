"""Compiled models kept on disk: AOTInductor packages and ONNX Runtime files, built once and
loaded in milliseconds.

A package (`<variant>-<key>.pt2`) is the model compiled by inductor for one precision and
a range of batch sizes (1 to `max_batch`, one compile for all); variants "onnx-fp32" and
"onnx-int8" are ONNX files (`<variant>-<key>.onnx`, any batch) that ONNX Runtime runs
(`infer/onnxrt.py`). Beside each is a signature (`<variant>-<key>.json`): the model's
content hash, the variant, the batch range, the torch and vitkit versions and the CPU's
features. The signature is checked before a package is opened, so one built for another
model, CPU or torch is rebuilt, never run.

A package is native code. vitkit loads packages only from its own cache (`cache_dir()`, a
directory owned by this user that no one else can write) or from a path the user names;
a package that arrives inside a model directory is never loaded on its own.

`auto` builds the candidates this CPU may run fast (`auto_candidates`: int8 by oneDNN where
the CPU has int8 dot products and the model carries calibration images, ONNX Runtime's int8
wherever it runs int8 fast, bf16 where the CPU has fast bf16, else fp32 by inductor and by
ONNX Runtime), measures each and the eager model on the batch sizes a service runs, and keeps
what pays: a package must beat the eager model by `MARGIN` (it holds a second copy of the
weights), int8 must beat the rest by as much (it costs some accuracy). The choice ("eager"
when nothing compiled pays)
and its reason are recorded beside the packages (`auto-<key>.json`), so the next start loads
the winner at once.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitkit import __version__
from vitkit.files import cache_root
from vitkit.infer.onnxrt import OnnxRuntimeNet, write_onnx
from vitkit.infer.optimize import optimize, quantized_graph
from vitkit.model.vit import ViT
from vitkit.runtime import cpu_flags, cpu_name, fast_precisions, int8_backend
from vitkit.weights.format import CheckpointError, atomic_write, one_line, read_json

FORMAT = 1
# The CPU features that change what inductor generates or which kernels oneDNN picks.
CPU_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
# A package is kept only when this much faster than the eager model, and int8 only when this
# much faster than the best other candidate.
MARGIN = 1.1
# Each measurement: at least this many calls and this long, at most MAX_CALLS calls.
MIN_CALLS, MIN_SECONDS, MAX_CALLS = 3, 1.0, 20

# What can be compiled: by inductor (AOTInductor packages), and by ONNX Runtime.
INDUCTOR_VARIANTS = ("fp32", "bf16", "int8")
ONNX_VARIANTS = ("onnx-fp32", "onnx-int8")
VARIANTS = INDUCTOR_VARIANTS + ONNX_VARIANTS

Runner = Callable[[torch.Tensor], torch.Tensor]


class StalePackage(CheckpointError):
    """A package that must not be run here: missing, torn, untrusted, or built for another
    model, precision, CPU or torch version (the message says which)."""


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a package was built for; a package runs only where all of it matches."""

    model: str  # sha256 of the config, labels and weights
    precision: str
    max_batch: int
    torch: str = torch.__version__
    vitkit: str = __version__
    machine: str = platform.machine()
    cpu: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: ViT, precision: str, max_batch: int) -> Signature:
        return cls(model_digest(model), precision, max_batch, cpu=cpu_features())

    @property
    def key(self) -> str:
        """A short name for the signature, unique to it (the file names' suffix)."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "cpu": list(self.cpu), "format": FORMAT}

    def mismatch(self, found: object) -> str | None:
        """Why the signature `found` (read from a file) differs from this one, or None."""
        if not isinstance(found, dict):
            return "its signature is not a JSON object"
        expected = self.as_dict()
        for name in ("format", "model", "precision", "max_batch", "torch", "vitkit", "machine"):
            if found.get(name) != expected[name]:
                return f"built for {name} {found.get(name)!r}, not {expected[name]!r}"
        if found.get("cpu") != expected["cpu"]:
            return "built on a CPU with other features"
        return None


def model_digest(model: ViT) -> str:
    """sha256 of everything a compiled model depends on: configuration, labels, weights."""
    digest = hashlib.sha256(model.config.to_json().encode())
    digest.update(json.dumps(model.labels).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cpu_features() -> tuple[str, ...]:
    """The CPU's name and the features in CPU_FEATURES it has."""
    return (cpu_name(), *sorted(set(CPU_FEATURES) & cpu_flags()))


def cache_dir() -> Path:
    """Where vitkit keeps the packages it builds (see `cache_root`)."""
    return cache_root() / "compiled"


def private_dir(path: Path) -> Path:
    """`path`, created if missing, checked to be a directory of this user's that no one else
    may write (a package there is run as native code)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise StalePackage(f"{path}: not a directory")
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StalePackage(
            f"{path}: owned by another user or writable by others; compiled models are "
            "native code, so vitkit does not load them from there"
        )
    return path


def package_path(directory: Path, signature: Signature) -> Path:
    suffix = ".onnx" if signature.precision in ONNX_VARIANTS else ".pt2"
    return directory / f"{signature.precision}-{signature.key}{suffix}"


def holds_gil(variant: str) -> bool:
    """Whether a call of this variant holds Python's interpreter lock until it returns:
    AOTInductor's runner does, onnxruntime releases it."""
    return variant not in ONNX_VARIANTS


def _signature_file(package: Path) -> Path:
    return package.with_suffix(".json")


# -- building -------------------------------------------------------------------------------
def build_package(model: ViT, signature: Signature, directory: Path) -> Path:
    """Compiles `model` for the signature's precision and batch range into `directory`.

    The package is written under a temporary name and renamed; the signature file, written
    last, is what marks it complete.
    """
    precision, n = signature.precision, signature.max_batch
    path = package_path(directory, signature)
    if precision in ONNX_VARIANTS:
        start = time.perf_counter()
        partial = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
        write_onnx(model, precision.removeprefix("onnx-"), partial)
        _mark_complete(path, partial, signature, start)
        return path
    c = model.config
    # Traced at batch 2: an example of 1 would make export specialise the batch to 1.
    example = torch.zeros(2, c.in_channels, c.image_size, c.image_size)
    net = _graph(model, precision)
    if precision == "bf16":
        example = example.bfloat16()
    # One compile for every batch size from 1 to max_batch.
    batch = torch.export.Dim("batch", min=1, max=max(n, 2))
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    partial = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # aoti wants .pt2
    # Freezing folds the weights into constants prepacked for oneDNN (int8 needs it).
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(partial), inductor_configs={"freezing": True}
    )
    _mark_complete(path, partial, signature, start)
    return path


def _mark_complete(path: Path, partial: Path, signature: Signature, start: float) -> None:
    """Moves the finished `partial` file to `path`, then writes the signature that vouches
    for it."""
    _signature_file(path).unlink(missing_ok=True)  # a stale one must not vouch for it
    os.replace(partial, path)
    record = {**signature.as_dict(), "compile_seconds": round(time.perf_counter() - start, 1)}
    atomic_write(_signature_file(path), json.dumps(record, indent=1) + "\n")


def _graph(model: ViT, precision: str) -> torch.nn.Module:
    """The network to compile for `precision` (the source model is left as it is)."""
    if precision == "int8":
        if model.calibration is None:
            raise ValueError("int8 needs calibration images; a model trained by vitkit has them")
        return quantized_graph(model, model.calibration)
    net = copy.deepcopy(model).cpu().eval()
    return net.to(torch.bfloat16) if precision == "bf16" else net.float()


# -- loading --------------------------------------------------------------------------------
def load_package(path: Path, expected: Signature) -> Runner:
    """The compiled model in `path`, if its signature matches `expected`.

    Raises StalePackage, naming the file and the reason, for a missing, torn or mismatched
    package; the package itself is not opened then. The runner takes normalised fp32
    images (any batch from 1 to max_batch) and returns fp32 logits.
    """
    sig_file = _signature_file(path)
    if not path.is_file() or not sig_file.is_file():
        raise StalePackage(f"{path}: no complete package")
    try:
        found = read_json(sig_file)
    except CheckpointError as e:
        raise StalePackage(str(e)) from None
    reason = expected.mismatch(found)
    if reason is not None:
        raise StalePackage(f"{path}: {reason}")
    if expected.precision in ONNX_VARIANTS:
        try:
            net = OnnxRuntimeNet(path, expected.precision.removeprefix("onnx-"))
        except Exception as e:  # a file torn after its signature was written
            raise StalePackage(f"{path}: cannot load: {one_line(str(e))}") from None
        return torch.inference_mode()(net)
    try:
        # The C++ loader itself: `aoti_load_package` would first import inductor (2 s on two
        # cores, holding the interpreter lock) only to flatten one tensor argument.
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    except Exception as e:  # a package torn after its signature was written
        raise StalePackage(f"{path}: cannot load: {one_line(str(e))}") from None
    dtype = torch.bfloat16 if expected.precision == "bf16" else torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:
        """Note: the call holds Python's interpreter lock until it returns."""
        with torch.inference_mode():
            return loader.run([x.to(dtype)])[0].float()

    return run


def images_per_second(run: Runner, model: ViT, batch_size: int) -> float:
    """Measured throughput of `run` on batches of `batch_size`, after one warm-up call."""
    c = model.config
    x = torch.randn(batch_size, c.in_channels, c.image_size, c.image_size)
    run(x)
    calls, start = 0, time.perf_counter()
    while calls < MIN_CALLS or (time.perf_counter() - start < MIN_SECONDS and calls < MAX_CALLS):
        run(x)
        calls += 1
    return batch_size * calls / (time.perf_counter() - start)


# -- auto: what pays ---------------------------------------------------------------------------
def auto_candidates(model: ViT) -> list[str]:
    """The variants `auto` compiles and measures on this CPU: oneDNN's int8 where the CPU
    has int8 dot products and the model calibration images; ONNX Runtime's int8 wherever some
    int8 is fast (on AMX or VNNI too: measured, not assumed slower); bf16 where fast, else fp32
    by inductor and by ONNX Runtime (faster than PyTorch on single images on AVX2 CPUs)."""
    fast = fast_precisions("cpu")
    out = []
    if int8_backend() == "onednn" and model.calibration is not None:
        out.append("int8")
    if "int8" in fast:
        out.append("onnx-int8")
    return [*out, "bf16"] if "bf16" in fast else [*out, "fp32", "onnx-fp32"]


def choose(speeds: dict[str, dict[int, float]]) -> tuple[str, str]:
    """What to serve ("eager" or a precision) from measured images/s per batch size, and why.

    Each is scored by the geometric mean of its throughputs (one image, a full batch), so
    neither a lone request nor a busy service is sacrificed; a package must beat "eager",
    and int8 the best of the rest, by MARGIN."""
    scores = {p: _geometric_mean(list(s.values())) for p, s in speeds.items()}
    shown = "; ".join(
        f"{p}: " + ", ".join(f"{v:.0f} img/s at batch {b}" for b, v in s.items())
        for p, s in speeds.items()
    )
    best = "eager" if "eager" in scores else None
    by_speed = sorted((p for p in scores if p != "eager"), key=scores.__getitem__)
    packages = [p for p in by_speed if "int8" not in p]
    if packages and (best is None or scores[packages[-1]] >= MARGIN * scores[best]):
        best = packages[-1]
    int8 = [p for p in by_speed if "int8" in p]
    if int8 and (best is None or scores[int8[-1]] >= MARGIN * scores[best]):
        return int8[-1], f"fastest measured ({shown})"
    assert best is not None
    if best == "eager":
        return best, f"no compiled model is {MARGIN:.1f}x faster than the eager one ({shown})"
    if int8:
        return best, f"int8 is not {MARGIN:.1f}x faster than {best} ({shown})"
    return best, f"{MARGIN:.1f}x faster than the eager model or more ({shown})"


def _geometric_mean(values: list[float]) -> float:
    product = 1.0
    for v in values:
        product *= v
    return product ** (1 / len(values))


def _choice_file(directory: Path, signature: Signature) -> Path:
    auto = dataclasses.replace(signature, precision="auto")
    return directory / f"auto-{auto.key}.json"


def _read_choice(path: Path, expected: Signature) -> tuple[str, str] | None:
    """The recorded auto choice (precision, why) for `expected` (precision "auto"), if any."""
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except CheckpointError:
        return None
    if not isinstance(record, dict) or expected.mismatch(record.get("signature")) is not None:
        return None
    choice, why = record.get("choice"), record.get("why")
    if choice not in ("eager", *VARIANTS) or not isinstance(why, str):
        return None
    return choice, why


@dataclasses.dataclass
class Compiled:
    """A loaded package (its runner, precision and file), or the measured finding that the
    eager model is as fast (`run` None, precision "eager"); and why it was chosen."""

    run: Runner | None
    precision: str
    path: Path
    why: str


def variant(precision: str) -> str:
    """What `precision` compiles as here: int8 by ONNX Runtime on CPUs whose int8 it runs
    (`runtime.int8_backend`), otherwise by inductor."""
    return "onnx-int8" if precision == "int8" and int8_backend() == "onnxruntime" else precision


def find_compiled(model: ViT, precision: str, max_batch: int, directory: Path) -> Compiled:
    """The package in `directory` for `precision` ("auto": the recorded choice), loaded.

    Raises StalePackage when there is none that may run here; nothing is built."""
    precision = variant(precision)
    signature = Signature.of(model, precision, max_batch)
    why = "asked for"
    if precision == "auto":
        record = _choice_file(directory, signature)
        choice = _read_choice(record, signature)
        if choice is None:
            raise StalePackage(f"{directory}: no measured choice for this model and CPU")
        precision, why = choice
        if precision == "eager":
            return Compiled(None, precision, record, why)
        signature = dataclasses.replace(signature, precision=precision)
    path = package_path(directory, signature)
    return Compiled(load_package(path, signature), precision, path, why)


def build_compiled(
    model: ViT, precision: str, max_batch: int, directory: Path, log: Callable[[str], None]
) -> Compiled:
    """The package for `precision` in `directory`, built where missing or stale; for "auto",
    every candidate is built and measured against the eager model, and the choice recorded
    (see the module's docstring). `log` gets a line per step."""
    precision = variant(precision)
    base = Signature.of(model, precision, max_batch)
    wanted = auto_candidates(model) if precision == "auto" else [precision]
    built: dict[str, Compiled] = {}
    for p in wanted:
        signature = dataclasses.replace(base, precision=p)
        path = package_path(directory, signature)
        try:
            built[p] = Compiled(load_package(path, signature), p, path, "asked for")
            log(f"{p}: compiled already ({path})")
        except StalePackage as e:
            stale = f" (replacing {e})" if path.exists() else ""
            log(f"{p}: compiling for batches of 1 to {max_batch}{stale}...")
            start = time.perf_counter()
            build_package(model, signature, directory)
            built[p] = Compiled(load_package(path, signature), p, path, "asked for")
            log(f"{p}: compiled in {time.perf_counter() - start:.0f} s into {path}")
    if precision != "auto":
        return built[precision]
    sizes = sorted({1, max_batch})
    runs: dict[str, Runner] = {p: c.run for p, c in built.items() if c.run is not None}
    runs["eager"] = optimize(model, "bf16" if "bf16" in fast_precisions("cpu") else "fp32")
    speeds = {p: {n: images_per_second(run, model, n) for n in sizes} for p, run in runs.items()}
    choice, why = choose(speeds)
    record = _choice_file(directory, base)
    _write_choice(record, base, choice, why)
    log(f"auto: {choice}: {why}")
    if choice == "eager":
        return Compiled(None, choice, record, why)
    built[choice].why = why
    return built[choice]


def _write_choice(path: Path, signature: Signature, choice: str, why: str) -> None:
    record = {"signature": signature.as_dict(), "choice": choice, "why": why}
    atomic_write(path, json.dumps(record, indent=1) + "\n")
