"""Compiled models on disk (AOTInductor packages, ONNX Runtime files) and the service
switching to them: signatures that keep a package from running where it was not built for,
the measured auto choice, and a service that answers from the first second and changes modes
without failing a request."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.serving import serve_process
from vitkit import create_model, runtime
from vitkit.infer import compiled as compiled_module
from vitkit.infer.compiled import (
    Signature,
    StalePackage,
    auto_candidates,
    build_compiled,
    choose,
    find_compiled,
    holds_gil,
    model_digest,
    package_path,
    private_dir,
)
from vitkit.infer.labels import top_k
from vitkit.model.vit import ViT
from vitkit.serve.app import create_app
from vitkit.weights.format import save_model


def small_model() -> ViT:
    model = create_model("Ti/4@28", width=64, depth=2, heads=2, seed=0)
    # The initial zero head predicts uniformly; random weights give distinct probabilities.
    torch.nn.init.normal_(model.head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    model.labels = [f"class {i}" for i in range(model.config.num_classes)]
    return model.eval()


def fake_package(directory: Path, signature: Signature, **changes: object) -> Path:
    """Garbage in a package's place, with a signature file altered by `changes`: it must be
    refused before it is opened (opening garbage would raise something else)."""
    path = package_path(directory, signature)
    path.write_bytes(b"not a package")
    record = {**signature.as_dict(), **changes}
    path.with_suffix(".json").write_text(json.dumps(record))
    return path


# -- signatures -------------------------------------------------------------------------------
def test_the_digest_follows_weights_and_labels():
    model = small_model()
    digest = model_digest(model)
    assert digest == model_digest(small_model())
    model.labels = list(reversed(model.labels))
    assert model_digest(model) != digest
    model = small_model()
    with torch.no_grad():
        model.head.bias[0] += 1e-6
    assert model_digest(model) != digest


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("torch", "2.0.0", "torch"),
        ("cpu", ["Intel(R) Xeon(R) Platinum 8480+", "amx_int8", "avx512f"], "CPU"),
        ("model", "0" * 64, "model"),
        ("vitkit", "0.0.1", "vitkit"),
        ("max_batch", 64, "max_batch"),
    ],
)
def test_a_package_built_elsewhere_is_refused_unopened(tmp_path, field, value, reason):
    model = small_model()
    signature = Signature.of(model, "fp32", 8)
    fake_package(tmp_path, signature, **{field: value})
    with pytest.raises(StalePackage, match=reason):
        find_compiled(model, "fp32", 8, tmp_path)


def test_a_stale_package_is_rebuilt_not_run(tmp_path, monkeypatch):
    model = small_model()
    signature = Signature.of(model, "fp32", 8)
    path = fake_package(tmp_path, signature, torch="1.13.0")
    built = []

    def build(model: ViT, sig: Signature, directory: Path) -> Path:
        built.append(sig)
        raise RuntimeError("stop here: the rebuild was asked for")

    monkeypatch.setattr(compiled_module, "build_package", build)
    with pytest.raises(RuntimeError, match="rebuild"):
        build_compiled(model, "fp32", 8, tmp_path, lambda line: None)
    assert built == [signature] and path.read_bytes() == b"not a package"


def test_a_torn_signature_file_is_refused(tmp_path):
    model = small_model()
    path = fake_package(tmp_path, Signature.of(model, "fp32", 8))
    path.with_suffix(".json").write_text('{"torch": ')
    with pytest.raises(StalePackage, match="not valid JSON"):
        find_compiled(model, "fp32", 8, tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(StalePackage, match="no complete package"):
        find_compiled(model, "fp32", 8, tmp_path)


def test_auto_without_a_recorded_choice_finds_nothing(tmp_path):
    with pytest.raises(StalePackage, match="no measured choice"):
        find_compiled(small_model(), "auto", 8, tmp_path)


def test_the_cache_must_be_private(tmp_path):
    assert private_dir(tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StalePackage, match="writable by others"):
        private_dir(shared)


def test_signature_keys_differ_with_any_field():
    base = Signature("a" * 64, "fp32", 32, cpu=("cpu",))
    keys = {
        base.key,
        dataclasses.replace(base, precision="int8").key,
        dataclasses.replace(base, max_batch=16).key,
        dataclasses.replace(base, torch="0").key,
        dataclasses.replace(base, cpu=("cpu", "amx_int8")).key,
    }
    assert len(keys) == 5


# -- auto ----------------------------------------------------------------------------------------
def test_auto_keeps_only_what_pays():
    eager = {1: 50, 32: 400}
    choice, why = choose({"int8": {1: 105, 32: 900}, "bf16": {1: 100, 32: 850}, "eager": eager})
    assert choice == "bf16" and "int8 is not 1.1x faster than bf16" in why
    assert "900 img/s at batch 32" in why
    choice, _ = choose({"int8": {1: 150, 32: 1300}, "bf16": {1: 100, 32: 850}, "eager": eager})
    assert choice == "int8"
    choice, _ = choose({"bf16": {1: 80, 32: 1000}, "fp32": {1: 100, 32: 500}, "eager": eager})
    assert choice == "bf16"  # the geometric mean: the full batch's gain outweighs
    # A package that is not 1.1x the eager model is not worth its memory.
    choice, why = choose({"fp32": {1: 52, 32: 420}, "eager": eager})
    assert choice == "eager" and "no compiled model is 1.1x faster" in why
    choice, _ = choose({"fp32": {1: 80, 32: 500}, "eager": eager})
    assert choice == "fp32"


def test_auto_weighs_every_int8_against_the_rest():
    eager = {1: 50, 32: 400}
    speeds = {"onnx-int8": {1: 90, 32: 800}, "onnx-fp32": {1: 70, 32: 420}, "eager": eager}
    assert choose(speeds)[0] == "onnx-int8"
    choice, why = choose(speeds | {"fp32": {1: 85, 32: 760}})
    assert choice == "fp32" and "int8 is not 1.1x faster than fp32" in why
    both = {"int8": {1: 120, 32: 1000}, "onnx-int8": {1: 90, 32: 800}, "eager": eager}
    assert choose(both)[0] == "int8"


def test_auto_candidates_follow_the_cpu(monkeypatch):
    model = small_model()
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert auto_candidates(model) == ["onnx-int8", "fp32", "onnx-fp32"]
    assert compiled_module.variant("int8") == "onnx-int8"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"amx_int8", "amx_bf16"}))
    assert auto_candidates(model) == ["onnx-int8", "bf16"]  # no calibration images
    model.calibration = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    assert auto_candidates(model) == ["int8", "onnx-int8", "bf16"]
    assert compiled_module.variant("int8") == "int8"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["onnx-fp32", "onnx-int8"])
def test_an_onnx_package_is_built_signed_and_matches(tmp_path, variant):
    model = small_model()
    compiled = build_compiled(model, variant, 8, tmp_path, lambda line: None)
    assert compiled.path.suffix == ".onnx" and compiled.path.with_suffix(".json").is_file()
    assert not holds_gil(variant)
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        ref, out = model(x), compiled.run(x)
    tolerance = 1e-4 if variant == "onnx-fp32" else 0.3  # int8: rounding of every matmul
    torch.testing.assert_close(out, ref, atol=tolerance, rtol=0)
    if variant == "onnx-int8":  # one image per call: the batch does not change an answer
        torch.testing.assert_close(compiled.run(x[:1]), out[:1], atol=0, rtol=0)
    # Found again without building; a torn file under a valid signature is refused.
    assert find_compiled(model, variant, 8, tmp_path).path == compiled.path
    compiled.path.write_bytes(b"not onnx")
    with pytest.raises(StalePackage, match="cannot load"):
        find_compiled(model, variant, 8, tmp_path)


def test_a_recorded_eager_choice_loads_no_package(tmp_path):
    model = small_model()
    signature = Signature.of(model, "auto", 8)
    compiled_module._write_choice(
        compiled_module._choice_file(tmp_path, signature), signature, "eager", "measured"
    )
    found = find_compiled(model, "auto", 8, tmp_path)
    assert found.run is None and found.precision == "eager" and found.why == "measured"


# -- building, loading, serving (compiles: slow) -------------------------------------------------
def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small model compiled for fp32, batches of 1 to 4: (model, directory, Compiled)."""
    model = small_model()
    directory = tmp_path_factory.mktemp("compiled")
    return model, directory, build_compiled(model, "fp32", 4, directory, lambda line: None)


@pytest.mark.slow
def test_serve_runs_int8_in_onnx_runtime_where_the_cpu_lacks_vnni(tmp_path, monkeypatch):
    """`vitkit serve --precision int8` on an AVX2-only CPU: ONNX Runtime's int8, whole batches
    per call (it releases the interpreter lock, so nothing is split for the event loop)."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    model = small_model()
    build_compiled(model, "int8", 8, tmp_path, lambda line: None)
    app = create_app(model, max_batch=8, max_wait_ms=1, precision="int8", compiled_dir=tmp_path)
    engine = app.state.service.engine

    async def ask() -> tuple[dict, dict]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            for _ in range(100):
                if engine.compiled is not None:
                    break
                await asyncio.sleep(0.05)
            r = await client.post(
                "/v1/predict", content=png(0), headers={"content-type": "image/png"}
            )
            return r.json(), (await client.get("/readyz")).json()

    answer, ready = asyncio.run(ask())
    assert answer["mode"] == ready["mode"] == "compiled-onnx-int8"
    assert ready["images_per_call"] == 8


@pytest.mark.slow
def test_a_built_package_matches_the_model_at_every_batch_size(built):
    model, directory, compiled = built
    assert compiled.path.is_file() and compiled.precision == "fp32"
    again = find_compiled(model, "fp32", 4, directory)
    assert again.path == compiled.path and again.run is not None
    for n in (1, 3, 4):
        x = torch.randn(n, 1, 28, 28)
        with torch.inference_mode():
            torch.testing.assert_close(again.run(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_requests_during_the_switch_all_succeed_in_the_mode_they_report(built, monkeypatch):
    model, directory, compiled = built
    app = create_app(model, max_batch=4, max_wait_ms=1, precision="fp32", compiled_dir=directory)
    engine = app.state.service.engine
    gate = asyncio.Event()
    load = engine._load

    async def held_load(where: Path) -> bool:  # the package appears mid-traffic
        await gate.wait()
        return await load(where)

    monkeypatch.setattr(engine, "_load", held_load)
    uploads = [png(seed) for seed in range(6)]
    references = {}
    for seed, data in enumerate(uploads):
        x = app.state.service.inputs(data)
        with torch.inference_mode():
            references[seed, engine.eager_mode] = top_k(engine.eager(x), 3, model.labels)[0]
            references[seed, f"compiled-{compiled.precision}"] = top_k(
                compiled.run(x), 3, model.labels
            )[0]

    async def traffic() -> list[tuple[int, dict]]:
        transport = httpx.ASGITransport(app=app)
        answers = []
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):

            async def one(seed: int) -> None:
                r = await client.post(
                    "/v1/predict?top_k=3",
                    content=uploads[seed],
                    headers={"content-type": "image/png"},
                )
                assert r.status_code == 200, r.text
                answers.append((seed, r.json()))

            for round_ in range(40):
                await asyncio.gather(*(one(seed) for seed in range(6)))
                if round_ == 5:
                    gate.set()
                if engine.compiled is not None and round_ > 10:
                    break
            ready = (await client.get("/readyz")).json()
            info = (await client.get("/v1/model")).json()
        return answers, ready, info

    answers, ready, info = asyncio.run(traffic())
    modes = [body["mode"] for _, body in answers]
    assert modes[0] == engine.eager_mode and modes[-1] == f"compiled-{compiled.precision}"
    for seed, body in answers:
        want = references[seed, body["mode"]]
        assert [row["label"] for row in body["labels"]] == [label for label, _ in want]
        np.testing.assert_allclose(
            [row["probability"] for row in body["labels"]], [p for _, p in want], atol=1e-5
        )
    assert ready["mode"] == info["mode"] == modes[-1]
    assert ready["compile"]["state"] == "done" and ready["batch_sizes"] == {"1-4": modes[-1]}


@pytest.mark.slow
def test_vitkit_optimize_writes_a_package_serve_loads(built, tmp_path):
    model, _, _ = built
    source = save_model(model, tmp_path / "model")
    out = tmp_path / "deploy"
    command = [sys.executable, "-m", "vitkit", "optimize", str(source)]
    done = subprocess.run(
        [*command, "--precision", "fp32", "--max-batch", "4", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    package = Path(done.stdout.strip())
    assert package.parent == out and package.suffix == ".pt2"
    app = create_app(source, max_batch=4, precision="fp32", compiled_dir=out)

    async def served() -> str:
        async with app.router.lifespan_context(app):
            await app.state.service._compiling
            return app.state.service.engine.mode

    assert asyncio.run(served()) == "compiled-fp32"


@pytest.mark.slow
def test_serve_answers_at_once_while_compiling_in_the_background(tmp_path):
    """A cold start (empty cache): the first correct answer comes long before the compile
    (a minute for this model on 2 cores) could have finished; stopping the server stops it."""
    from vitkit import Classifier

    data = png(0)
    want = Classifier("fashion-mnist", precision="fp32").predict(Image.open(io.BytesIO(data)))
    env = {**os.environ, "VITKIT_CACHE": str(tmp_path / "cache")}
    start = time.monotonic()
    with serve_process(["fashion-mnist"], tmp_path / "stderr.txt", env) as (url, _, _):
        r = httpx.post(f"{url}/v1/predict", files={"file": ("a.png", data, "image/png")})
        elapsed = time.monotonic() - start
        assert r.status_code == 200
        body = r.json()
        assert body["labels"][0]["label"] == want[0].labels[0][0]
        assert body["mode"].startswith("eager")
        # Generous for a loaded CI machine, yet far below a blocking compile.
        assert elapsed < 20, f"first answer after {elapsed:.1f} s"
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["compile"]["state"] == "compiling"
        assert httpx.get(f"{url}/readyz", params={"full_speed": "true"}).status_code == 503
    leftovers = subprocess.run(
        ["pgrep", "-f", f"vitkit optimize .*{tmp_path}"], capture_output=True, text=True
    )
    assert leftovers.stdout == "", "the background compile outlived the server"


@pytest.mark.slow
def test_a_package_for_single_images(tmp_path):
    """`vitkit serve --max-batch 1`: the batch dimension stays dynamic (traced at 2)."""
    model = small_model()
    compiled = build_compiled(model, "fp32", 1, tmp_path, lambda line: None)
    x = torch.randn(1, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(compiled.run(x), model(x), atol=1e-4, rtol=1e-4)
