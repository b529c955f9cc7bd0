"""Load test of `vitkit serve`: concurrent clients against a server on loopback, compared with
batched `Classifier.predict` on the same images in this process.

    .venv/bin/python bench/serve_load.py                       # shipped model, 8 clients
    .venv/bin/python bench/serve_load.py --clients 16 --requests 4000 --max-batch 1

The server runs in a subprocess (as `vitkit serve MODEL --port 0`); the clients are threads
here, each with its own keep-alive connection, sending multipart PNG uploads. Both share the
machine's cores, as they would on one host.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from vitkit import Classifier

SERVE = """
import argparse, sys
from vitkit.cli.serve import add_serve_command
parser = argparse.ArgumentParser()
add_serve_command(parser.add_subparsers())
args = parser.parse_args(["serve", *sys.argv[1:]])
sys.exit(args.func(args))
"""


def start_server(model: str, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL, once it answers /healthz."""
    cmd = [sys.executable, "-c", SERVE, model, "--port", "0", "--log-level", "warning"]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    found = re.search(r"http://[\d.]+:\d+", proc.stdout.readline())
    if not found:
        proc.kill()
        raise SystemExit("the server did not start")
    url = found.group()
    for _ in range(200):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not become healthy")


def make_images(size: int, channels: int, count: int) -> list[bytes]:
    """Distinct random PNGs of the model's input size and channels."""
    rng = np.random.default_rng(0)
    shape = (size, size) if channels == 1 else (size, size, channels)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def load(url: str, images: list[bytes], clients: int, requests: int) -> dict[str, float]:
    """`requests` predictions from `clients` concurrent clients: throughput and latencies."""

    def client(n: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(n):
                start = time.perf_counter()
                files = {"file": ("x.png", images[i % len(images)], "image/png")}
                response = http.post("/v1/predict", files=files)
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200
        return latencies, errors

    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, shares))
    seconds = time.perf_counter() - start
    latencies = sorted(t for lat, _ in results for t in lat)
    return {
        "throughput": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "errors": sum(errors for _, errors in results),
        "seconds": seconds,
    }


def direct(model: str, images: list[bytes], batch_size: int, requests: int) -> float:
    """Images per second of `Classifier.predict` in batches, decoding the same PNGs."""
    classifier = Classifier(model, batch_size=batch_size)
    classifier.predict([Image.open(io.BytesIO(data)) for data in images[:batch_size]])  # warm-up
    pictures = [Image.open(io.BytesIO(images[i % len(images)])) for i in range(requests)]
    start = time.perf_counter()
    classifier.predict(pictures)
    return requests / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fashion-mnist", help="model directory or shipped name")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    args = p.parse_args()

    proc, url = start_server(args.model, args.max_batch, args.max_wait_ms)
    try:
        info = httpx.get(f"{url}/v1/model").json()
        pre = info["preprocessing"]
        images = make_images(pre["image_size"], pre["channels"], 64)
        load(url, images, args.clients, min(200, args.requests))  # warm-up
        before = httpx.get(f"{url}/v1/stats").json()
        result = load(url, images, args.clients, args.requests)
        after = httpx.get(f"{url}/v1/stats").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    batches = after["batches"] - before["batches"]
    mean_batch = (after["images"] - before["images"]) / batches if batches else float("nan")
    baseline = direct(args.model, images, args.max_batch, args.requests)

    print(
        f"vitkit serve {info['name']} ({info['parameters']:,} parameters, "
        f"{pre['image_size']} px): {args.clients} clients, {args.requests} requests, "
        f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms"
    )
    print(f"  throughput        {result['throughput']:8.1f} requests/s")
    print(f"  latency p50       {result['p50_ms']:8.1f} ms")
    print(f"  latency p99       {result['p99_ms']:8.1f} ms")
    print(f"  errors            {result['errors']:8d}")
    print(f"  mean batch size   {mean_batch:8.2f}")
    print(
        f"  direct predict    {baseline:8.1f} images/s (Classifier.predict, batch {args.max_batch})"
    )
    print(f"  served / direct   {result['throughput'] / baseline:8.3f}")


if __name__ == "__main__":
    main()
