"""Start-up of `vitkit serve`: seconds from process start to the port, to the first correct
answer, and to full speed (the compiled model serving), cold (empty cache) then warm.

    .venv/bin/python bench/serve_startup.py                 # the shipped model
    .venv/bin/python bench/serve_startup.py --model /tmp/s16 --max-batch 32

While the compile runs in the background, one client sends a request every 100 ms; their
latencies (p50/p99), against those of the idle eager model measured first, show what the
compile costs the service meanwhile. Every answer is checked against `Classifier.predict`.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
from PIL import Image

from vitkit import Classifier

PORT_LINE = re.compile(r"on (http://\S+)/ ")
# The client's pause between requests while the compile runs: steady light traffic.
PACE_S = 0.1


def sample_png(size: int, channels: int) -> bytes:
    rng = np.random.default_rng(0)
    shape = (size, size) if channels == 1 else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def start(model: str, cache: str, args: list[str]) -> tuple[subprocess.Popen, str, float]:
    """The server, its URL, and the time it was started."""
    env = {**os.environ, "VITKIT_CACHE": cache}
    command = [sys.executable, "-m", "vitkit", "serve", model, "--port", "0", *args]
    t0 = time.time()
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    url = PORT_LINE.search(server.stdout.readline()).group(1)  # type: ignore[union-attr]
    # The access log goes on coming: read it, or the server blocks once the pipe is full.
    threading.Thread(target=server.stdout.read, daemon=True).start()
    return server, url, t0


def run(model: str, cache: str, png: bytes, want: str, args: list[str]) -> dict[str, object]:
    """One start: the seconds to each milestone and the latencies while compiling."""
    server, url, t0 = start(model, cache, args)
    try:
        port_s = time.time() - t0
        with httpx.Client(base_url=url, timeout=60) as client:
            first_s = None
            latencies: list[float] = []
            while True:
                start_request = time.perf_counter()
                r = client.post("/v1/predict", files={"file": ("x.png", png, "image/png")})
                latencies.append((time.perf_counter() - start_request) * 1000)
                body = r.json()
                assert r.status_code == 200 and body["labels"][0]["label"] == want, body
                if first_s is None:
                    first_s = time.time() - t0
                ready = client.get("/readyz").json()
                # Done: a compiled model serves, or the measurement kept the eager one.
                if ready["compile"]["state"] in ("done", "failed", "off"):
                    break
                if time.time() - t0 > 900:
                    break
                time.sleep(PACE_S)
        return {
            "port_s": round(port_s, 2),
            "first_answer_s": round(first_s, 2),
            "full_speed_s": round(time.time() - t0, 1),
            "mode": body["mode"],
            "while_compiling_ms": _percentiles(latencies[:-1]),
            "compile": ready["compile"]["state"],
            "why": ready["compile"]["why"],
        }
    finally:
        server.terminate()
        server.wait(10)


def eager_latency(model: str, cache: str, png: bytes, args: list[str]) -> dict[str, float]:
    """Latency of the idle eager model (no compiled model, nothing compiling)."""
    server, url, _ = start(model, cache, [*args, "--no-compile"])
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            times = []
            for _ in range(60):
                t = time.perf_counter()
                client.post("/v1/predict", files={"file": ("x.png", png, "image/png")})
                times.append((time.perf_counter() - t) * 1000)
        return _percentiles(times[10:])
    finally:
        server.terminate()
        server.wait(10)


def _percentiles(ms: list[float]) -> dict[str, float]:
    if len(ms) < 2:
        return {"n": len(ms)}
    q = statistics.quantiles(ms, n=100)
    return {"n": len(ms), "p50": round(q[49], 1), "p99": round(q[98], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fashion-mnist")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    a = parser.parse_args()
    classifier = Classifier(a.model, precision="fp32")
    c = classifier.model.config
    png = sample_png(c.image_size, c.in_channels)
    want = classifier.predict(Image.open(io.BytesIO(png)), top_k=1)[0].labels[0][0]
    args = ["--max-batch", str(a.max_batch), "--precision", a.precision]
    with tempfile.TemporaryDirectory() as cache:
        print("eager, idle:", eager_latency(a.model, cache, png, args), flush=True)
        print("cold start: ", run(a.model, cache, png, want, args), flush=True)
        print("warm start: ", run(a.model, cache, png, want, args), flush=True)


if __name__ == "__main__":
    main()
