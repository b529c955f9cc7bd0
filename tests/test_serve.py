"""The HTTP service and its web page: API, bad input, micro-batching, load, a real browser."""

import argparse
import base64
import io
import json
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.serving import serve_process
from vitkit import Classifier, create_model, load_model, save_model
from vitkit.cli.serve import add_serve_command, loopback_hosts
from vitkit.serve.app import create_app

LABELS = [f"class {i}" for i in range(10)]
MAX_UPLOAD = 400_000
MAX_PIXELS = 1_000_000
CHROMIUM = Path("/usr/bin/chromium")


def small_model():
    model = create_model("Ti/4@28", width=64, depth=2, heads=2, seed=0)
    # The initial zero head predicts uniformly; random weights give distinct probabilities.
    torch.nn.init.normal_(model.head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    return model.eval()


def encode(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (valid chunks, no real data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


IMAGES = {
    "grey.png": encode(noise(0, (28, 28))),
    "wide.jpg": encode(noise(1, (40, 64, 3)), "JPEG", quality=90),
    "alpha.png": encode(noise(2, (33, 33, 4))),
    "big.png": encode(noise(3, (300, 200, 3))),
}
GOOD = IMAGES["grey.png"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(small_model(), tmp_path_factory.mktemp("serve") / "model", labels=LABELS)


@pytest.fixture(scope="module")
def client(model_dir):
    app = create_app(model_dir, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
    with TestClient(app) as c:
        yield c


def upload(client, image: bytes, path: str = "/v1/predict", **kwargs):
    return client.post(path, files={"file": ("image", image, "application/octet-stream")}, **kwargs)


def as_pairs(response) -> list[tuple[str, float]]:
    return [(row["label"], row["probability"]) for row in response.json()["labels"]]


def assert_same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [label for label, _ in got] == [label for label, _ in want]
    np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-5)


# -- the API --------------------------------------------------------------------------------
def test_predict_agrees_with_classifier(client, model_dir, tmp_path):
    classifier = Classifier(model_dir)
    for name, data in IMAGES.items():
        (tmp_path / name).write_bytes(data)
        want = classifier.predict(tmp_path / name, top_k=3)[0].labels
        multipart = upload(client, data, params={"top_k": 3})
        as_json = client.post(
            "/v1/predict", json={"image": base64.b64encode(data).decode(), "top_k": 3}
        )
        raw = client.post(
            "/v1/predict?top_k=3", content=data, headers={"content-type": "image/png"}
        )
        for response in (multipart, as_json, raw):
            assert response.status_code == 200, response.text
            assert_same(as_pairs(response), want)
            body = response.json()
            assert body["model"] == "model" and body["latency_ms"] > 0


def test_top_k_sources_and_bounds(client):
    assert len(upload(client, GOOD).json()["labels"]) == 5  # the default
    assert len(upload(client, GOOD, data={"top_k": "2"}).json()["labels"]) == 2  # form field
    data_url = "data:image/png;base64," + base64.b64encode(GOOD).decode()
    assert (
        len(client.post("/v1/predict", json={"image": data_url, "top_k": 1}).json()["labels"]) == 1
    )
    assert len(upload(client, GOOD, params={"top_k": 50}).json()["labels"]) == 10  # all classes
    for bad in ({"params": {"top_k": 0}}, {"params": {"top_k": "x"}}, {"data": {"top_k": "-1"}}):
        response = upload(client, GOOD, **bad)
        assert response.status_code == 422 and "top_k" in response.json()["error"]


@pytest.mark.parametrize("value", ["\u00b2", "\u2460", "9" * 5000])
def test_top_k_that_int_cannot_read_is_a_422(client, value):
    # "²" and "①" pass str.isdigit() but not int(); 5000 digits pass neither int()'s limit.
    for how in ({"data": {"top_k": value}}, {"params": {"top_k": value}}):
        response = upload(client, GOOD, **how)
        assert response.status_code == 422 and "top_k" in response.json()["error"]
    response = client.post(
        "/v1/predict", json={"image": base64.b64encode(GOOD).decode(), "top_k": value}
    )
    assert response.status_code == 422 and "top_k" in response.json()["error"]


def test_model_health_page_and_docs(client):
    info = client.get("/v1/model").json()
    assert info["name"] == "model" and info["labels"] == LABELS
    assert info["config"]["width"] == 64
    assert info["preprocessing"] == {
        "image_size": 28,
        "channels": 1,
        "mean": list(info["config"]["mean"]),
        "std": list(info["config"]["std"]),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
    }
    assert client.get("/healthz").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text):
        assert client.get(asset).status_code == 200, asset
    assert "http" not in re.sub(r"<!--.*?-->", "", page.text)  # nothing from outside (offline)
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def test_create_app_and_command_arguments(model_dir):
    with pytest.raises(ValueError, match="max_batch"):
        create_app(model_dir, max_batch=0)
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve", "fashion-mnist", "--port", "0", "--max-batch", "8"])
    assert args.model == "fashion-mnist" and args.port == 0 and args.max_batch == 8
    assert args.host == "127.0.0.1" and args.func.__name__ == "cmd_serve"
    assert args.max_queue is None
    assert parser.parse_args(["serve", "m", "--max-queue", "3"]).max_queue == 3
    limits = create_app(model_dir, max_batch=4).state.service.info["limits"]
    assert limits["max_queue"] == 32 and limits["max_explanations"] == 2


def test_loopback_hosts_for_the_host_check():
    for host in ("127.0.0.1", "localhost", "::1"):
        assert {"127.0.0.1", "localhost", "[::1]"} <= set(loopback_hosts(host))
    assert "127.0.0.2" in loopback_hosts("127.0.0.2")
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        assert loopback_hosts(host) is None  # reachable under other names: any Host


@pytest.mark.slow
def test_a_headless_model_is_refused_at_start_up(tmp_path):
    headless = create_model("Ti/4@28", width=64, depth=2, heads=2, num_classes=0)
    with pytest.raises(ValueError, match=r"no classification head \(num_classes=0\)"):
        create_app(headless)
    directory = save_model(headless, tmp_path / "headless")
    done = subprocess.run(
        [sys.executable, "-m", "vitkit", "serve", str(directory), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no classification head" in lines[0], done.stderr


# -- bad input ------------------------------------------------------------------------------
def _chunks(size: int):
    for _ in range(size // 10_000):
        yield b"\x00" * 10_000


BAD_REQUESTS = {
    "not an image": (422, {"files": {"file": ("a.png", b"hello, world" * 10)}}),
    "empty file": (422, {"files": {"file": ("a.png", b"")}}),
    "truncated PNG": (422, {"files": {"file": ("a.png", IMAGES["big.png"][:5000])}}),
    "truncated JPEG": (
        422,
        {"files": {"file": ("a.jpg", encode(noise(4, (200, 200, 3)), "JPEG")[:3000])}},
    ),
    "PostScript": (422, {"files": {"file": ("a.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n")}}),
    "pixels over the limit": (413, {"files": {"file": ("a.png", png_declaring(5000, 5000))}}),
    "Pillow's bomb error": (413, {"files": {"file": ("a.png", png_declaring(100_000, 100_000))}}),
    "real bomb": (413, {"files": {"file": ("a.png", encode(np.zeros((1500, 1500), np.uint8)))}}),
    "body over the limit": (
        413,
        {"content": b"\x00" * (MAX_UPLOAD + 1), "headers": {"content-type": "image/png"}},
    ),
    "chunked body over the limit": (
        413,
        {"content": _chunks(MAX_UPLOAD + 20_000), "headers": {"content-type": "image/png"}},
    ),
    "text/plain": (415, {"content": GOOD, "headers": {"content-type": "text/plain"}}),
    "no content type": (415, {"content": GOOD}),
    "malformed JSON": (
        400,
        {"content": b'{"image": ', "headers": {"content-type": "application/json"}},
    ),
    "JSON nested too deep": (
        400,
        {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}},
    ),
    "JSON not an object": (422, {"json": ["image"]}),
    "JSON without image": (422, {"json": {"top_k": 3}}),
    "bad base64": (400, {"json": {"image": "not base64!"}}),
    "data URL not base64": (400, {"json": {"image": "data:image/png,abc"}}),
    "JSON top_k not a number": (
        422,
        {"json": {"image": base64.b64encode(GOOD).decode(), "top_k": "many"}},
    ),
    "multipart without boundary": (
        400,
        {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
    ),
    "multipart without file": (422, {"data": {"top_k": "3"}, "files": {"other": ("a.png", GOOD)}}),
    "two files": (400, {"files": [("file", ("a.png", GOOD)), ("file", ("b.png", GOOD))]}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_that_says_why(client, case):
    status, kwargs = BAD_REQUESTS[case]
    response = client.post("/v1/predict", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert upload(client, GOOD).status_code == 200  # the service carries on


def test_unknown_routes_and_methods_are_json(client):
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/v1/predict").status_code == 405


def test_fuzz_malformed_uploads_never_5xx(client):
    rng = random.Random(0)
    png, jpeg = IMAGES["big.png"], encode(noise(5, (120, 90, 3)), "JPEG")
    headers = [
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xe0",
        b"GIF89a",
        b"BM",
        b"RIFF\x00\x00\x00\x00WEBP",
        b"II*\x00",
        b"P5\n",
    ]

    def corrupt(data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    def body() -> bytes:
        kind = rng.randrange(6)
        if kind == 0:
            return rng.randbytes(rng.randint(0, 3000))
        if kind == 1:
            source = rng.choice([png, jpeg])
            return source[: rng.randint(0, len(source) - 1)]
        if kind == 2:
            return corrupt(rng.choice([png, jpeg]))
        if kind == 3:
            return rng.choice(headers) + rng.randbytes(rng.randint(0, 200))
        if kind == 4:
            return png_declaring(rng.randint(0, 2**31 - 1), rng.randint(0, 2**31 - 1))
        return png_declaring(rng.randint(1, 3000), rng.randint(1, 3000))

    statuses = []
    for i in range(300):
        way = i % 4
        if way == 0:
            response = upload(client, body())
        elif way == 1:
            response = client.post("/v1/predict", json={"image": base64.b64encode(body()).decode()})
        elif way == 2:
            kind = rng.choice(
                [
                    "image/png",
                    "image/jpeg",
                    "application/octet-stream",
                    "multipart/form-data; boundary=x",
                    "multipart/form-data; boundary=",
                    "text/csv",
                    "",
                ]
            )
            content = body()
            if kind.endswith("=x") and rng.random() < 0.5:  # a real envelope, maybe cut short
                part = b'Content-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
                content = b"--x\r\n" + part + content + b"\r\n--x--\r\n"
                content = content[: rng.randint(1, len(content))]
            response = client.post("/v1/predict", content=content, headers={"content-type": kind})
        else:
            text = rng.choice(
                ['{"image": 1', '{"image": "=="}', "[]", "nul", '{"image": "\u00e9"}']
            )
            garbage = (text + rng.randbytes(rng.randint(0, 20)).decode("latin-1")).encode()
            response = client.post(
                "/v1/predict", content=garbage, headers={"content-type": "application/json"}
            )
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.json()["error"]
    assert statuses.count(200) < len(statuses)  # the inputs really were mostly broken
    assert upload(client, GOOD).status_code == 200


# -- micro-batching -------------------------------------------------------------------------
def test_concurrent_requests_are_batched(model_dir):
    images = [encode(noise(10 + i, (28, 28))) for i in range(24)]
    want = Classifier(model_dir).predict([Image.open(io.BytesIO(d)) for d in images], top_k=3)
    model = load_model(model_dir)
    app = create_app(model, max_batch=8, max_wait_ms=20)
    batcher = app.state.service.batcher
    sizes = []
    forward = model.forward

    def counted_forward(x):
        if not sizes:  # the first batch holds the worker until every other request is queued
            deadline = time.monotonic() + 30
            while batcher.queued < len(images) - len(x) and time.monotonic() < deadline:
                time.sleep(0.01)
        sizes.append(len(x))
        return forward(x)

    model.forward = counted_forward
    with TestClient(app) as client:
        with ThreadPoolExecutor(len(images)) as pool:
            responses = list(pool.map(lambda d: upload(client, d, params={"top_k": 3}), images))
        stats = client.get("/v1/stats").json()
    for response, prediction in zip(responses, want, strict=True):
        assert response.status_code == 200
        assert_same(as_pairs(response), prediction.labels)
    # After the first batch, the 24 - n queued requests run as ceil((24 - n) / 8) batches.
    assert sum(sizes) == 24 and max(sizes) == 8
    assert len(sizes) == 1 + -(-(24 - sizes[0]) // 8)
    assert stats["batches"] == len(sizes) and stats["images"] == 24 and stats["queued"] == 0
    assert stats["batch_sizes"] == {str(s): sizes.count(s) for s in sorted(set(sizes))}


def test_a_failed_model_call_fails_only_its_requests(model_dir):
    model = load_model(model_dir)
    forward, failures = model.forward, [1]

    def flaky_forward(x):
        if failures:
            failures.pop()
            raise RuntimeError("out of memory")
        return forward(x)

    model.forward = flaky_forward
    with TestClient(create_app(model), raise_server_exceptions=False) as client:
        failed = upload(client, GOOD)
        assert failed.status_code == 500 and "RuntimeError" in failed.json()["error"]
        assert upload(client, GOOD).status_code == 200
        assert client.get("/healthz").status_code == 200


# -- explain --------------------------------------------------------------------------------
def test_explain_png_and_json(client):
    top = as_pairs(upload(client, GOOD, params={"top_k": 3}))
    response = upload(client, GOOD, "/v1/explain", params={"top_k": 3})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.mode == "RGB" and overlay.width >= 28
    labels = json.loads(response.headers["x-labels"])
    assert_same([(r["label"], r["probability"]) for r in labels], top)
    for method in ("rollout", "last-layer", "grad-rollout"):
        body = client.post(
            "/v1/explain?format=json",
            json={"image": base64.b64encode(GOOD).decode(), "method": method, "top_k": 2},
        ).json()
        assert body["method"] == method and len(body["labels"]) == 2
        heatmap = np.array(body["heatmap"])
        assert heatmap.shape == (7, 7) and heatmap.min() >= 0 and heatmap.max() <= 1
        assert Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).format == "PNG"
    form = upload(client, GOOD, "/v1/explain", data={"method": "last-layer"})
    assert form.status_code == 200


def test_explain_bad_input(client):
    bad_method = upload(client, GOOD, "/v1/explain", params={"method": "saliency"})
    assert bad_method.status_code == 422 and "rollout" in bad_method.json()["error"]
    assert upload(client, b"not an image", "/v1/explain").status_code == 422
    assert upload(client, png_declaring(9000, 9000), "/v1/explain").status_code == 413
    bad_format = upload(client, GOOD, "/v1/explain", params={"format": "gif"})
    assert bad_format.status_code == 422 and "format" in bad_format.json()["error"]
    assert upload(client, GOOD, "/v1/explain").status_code == 200


# -- a real server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vitkit serve fashion-mnist --port 0` in a subprocess: (base URL, process id)."""
    log = tmp_path_factory.mktemp("server") / "stderr.txt"
    # fp32, eager: compiling would spend a minute (tests/test_compiled.py covers it).
    args = ["fashion-mnist", "--precision", "fp32", "--no-compile", "--log-level", "warning"]
    with serve_process(args, log) as (url, _, proc):
        yield url, proc.pid


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc for RSS")
def test_load_on_a_real_server(server):
    url, pid = server
    images = [encode(noise(20 + i, (28, 28))) for i in range(4)] + [
        IMAGES["wide.jpg"],
        IMAGES["big.png"],
    ]
    clients, per_round = 8, 200

    def worker(n: int) -> list[str]:
        errors = []
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(n):
                data = images[i % len(images)]
                response = http.post("/v1/predict", files={"file": ("x", data)})
                if response.status_code != 200 or not response.json()["labels"]:
                    errors.append(f"{response.status_code} {response.text[:200]}")
        return errors

    def round_() -> list[str]:
        with ThreadPoolExecutor(clients) as pool:
            return [
                e for errors in pool.map(worker, [per_round // clients] * clients) for e in errors
            ]

    assert round_() == []
    after_first = rss_bytes(pid)
    assert round_() == []
    growth = rss_bytes(pid) - after_first
    assert growth < 32 * 1024 * 1024, f"server RSS grew by {growth / 2**20:.1f} MiB"
    stats = httpx.get(f"{url}/v1/stats").json()
    assert stats["images"] >= 2 * per_round


def _trouser_like() -> np.ndarray:
    """A Fashion-MNIST-like 28 x 28 picture: a bright pair of legs on black."""
    image = np.zeros((28, 28), np.uint8)
    image[2:7, 8:20] = 190
    image[7:27, 8:13] = 200
    image[7:27, 15:20] = 200
    return image


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} to drive the page")
def test_web_page_in_a_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, _ = server
    picture = tmp_path / "trousers.png"
    picture.write_bytes(encode(_trouser_like()))
    bag = encode(np.pad(np.full((14, 18), 160, np.uint8), ((9, 5), (5, 5))))
    classifier = Classifier("fashion-mnist")
    want = classifier.predict(picture, top_k=1)[0].labels[0][0]
    want_bag = classifier.predict(Image.open(io.BytesIO(bag)), top_k=1)[0].labels[0][0]
    overlay_ready = (
        "() => { const img = document.getElementById('overlay');"
        " return img.src && img.complete && img.naturalWidth > 0; }"
    )
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            page.wait_for_function(
                "document.getElementById('model-info').textContent.includes('fashion-mnist')"
            )
            page.set_input_files("#file", str(picture))
            page.wait_for_selector("#result:not([hidden])")
            page.wait_for_function(overlay_ready)
            assert page.inner_text("#top-label") == want
            assert page.locator("#bars li").count() == 5
            assert page.get_attribute("#overlay", "alt")
            assert page.evaluate("document.getElementById('overlay').naturalWidth") >= 224
            assert page.is_hidden("#error")

            # Dropping a second image on the drop zone classifies that one.
            page.evaluate(
                """(b64) => {
                    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                    const data = new DataTransfer();
                    data.items.add(new File([bytes], "bag.png", { type: "image/png" }));
                    const event = new DragEvent("drop", { dataTransfer: data, bubbles: true });
                    document.getElementById("drop").dispatchEvent(event);
                }""",
                base64.b64encode(bag).decode(),
            )
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('bag.png:')"
            )
            page.wait_for_function(overlay_ready)
            assert page.inner_text("#top-label") == want_bag

            # A file that is not an image: the page says so, and the service carries on.
            (tmp_path / "notes.txt").write_text("not an image")
            page.set_input_files("#file", str(tmp_path / "notes.txt"))
            page.wait_for_selector("#error:not([hidden])")
            assert "not an image" in page.inner_text("#error")
        finally:
            browser.close()
