"""Load test of `vitkit serve`: concurrent clients against a server on loopback, compared with
batched `Classifier.predict` on the same images in this process.

    .venv/bin/python bench/serve_load.py                       # shipped model, 8 clients
    .venv/bin/python bench/serve_load.py --clients 16 --requests 4000 --max-batch 1
    .venv/bin/python bench/serve_load.py --mode eager          # no compiled model
    .venv/bin/python bench/serve_load.py --precision int8      # compiled int8, if it pays or not
    .venv/bin/python bench/serve_load.py --clients 256 --max-queue 32   # overload: 503s

By default the server is measured once its compiled model serves (built on first use, then
kept in vitkit's cache). Refused requests (503) are counted apart, their clients back off
50 ms; latencies are those of the answered requests.

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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL, once it serves in the mode asked for (compiled:
    once /readyz?full_speed=true answers 200, the package built or loaded)."""
    cmd = [sys.executable, "-c", SERVE, args.model, "--port", "0", "--log-level", "warning"]
    cmd += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    cmd += ["--precision", args.precision, "--max-connections", str(4 * args.clients + 16)]
    if args.max_queue is not None:
        cmd += ["--max-queue", str(args.max_queue)]
    if args.mode == "eager":
        cmd.append("--no-compile")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    found = re.search(r"http://[\d.]+:\d+", proc.stdout.readline())
    if not found:
        proc.kill()
        raise SystemExit("the server did not start")
    url = found.group()
    ready = {"full_speed": "true"} if args.mode == "compiled" else {}
    deadline = time.monotonic() + args.compile_timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", params=ready).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not serve in {args.mode} mode in time")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (Linux), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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

    def client(n: int) -> tuple[list[float], Counter[int]]:
        latencies, statuses = [], Counter()
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(n):
                start = time.perf_counter()
                files = {"file": ("x.png", images[i % len(images)], "image/png")}
                response = http.post("/v1/predict", files=files)
                statuses[response.status_code] += 1
                if response.status_code == 200:  # latency of the answers, not the refusals
                    latencies.append(time.perf_counter() - start)
                else:
                    time.sleep(0.05)  # a refused client backs off before retrying
        return latencies, statuses

    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, shares))
    seconds = time.perf_counter() - start
    latencies = sorted(t for lat, _ in results for t in lat)
    statuses = sum((s for _, s in results), Counter())
    return {
        "throughput": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "refused": statuses[503],
        "errors": sum(n for status, n in statuses.items() if status not in (200, 503)),
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
    p.add_argument("--max-queue", type=int, help="the server's (default 8 x max batch)")
    p.add_argument("--precision", default="auto")
    p.add_argument(
        "--mode",
        choices=["compiled", "eager"],
        default="compiled",
        help="compiled: wait until the compiled model serves (built once, then cached)",
    )
    p.add_argument("--compile-timeout", type=float, default=900, metavar="SECONDS")
    args = p.parse_args()

    proc, url = start_server(args)
    try:
        info = httpx.get(f"{url}/v1/model").json()
        pre = info["preprocessing"]
        images = make_images(pre["image_size"], pre["channels"], 64)
        load(url, images, args.clients, min(200, args.requests))  # warm-up
        before = httpx.get(f"{url}/v1/stats").json()
        result = load(url, images, args.clients, args.requests)
        after = httpx.get(f"{url}/v1/stats").json()
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    batches = after["batches"] - before["batches"]
    mean_batch = (after["images"] - before["images"]) / batches if batches else float("nan")
    baseline = direct(args.model, images, args.max_batch, args.requests)

    print(
        f"vitkit serve {info['name']} ({info['parameters']:,} parameters, "
        f"{pre['image_size']} px): {args.clients} clients, {args.requests} requests, "
        f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, mode {info['mode']}"
    )
    print(f"  throughput        {result['throughput']:8.1f} requests/s")
    print(f"  latency p50       {result['p50_ms']:8.1f} ms")
    print(f"  latency p99       {result['p99_ms']:8.1f} ms")
    print(f"  refused (503)     {result['refused']:8d}")
    print(f"  errors            {result['errors']:8d}")
    print(f"  server peak RSS   {rss:8.0f} MiB")
    print(f"  mean batch size   {mean_batch:8.2f}")
    print(
        f"  direct predict    {baseline:8.1f} images/s (Classifier.predict, batch {args.max_batch})"
    )
    print(f"  served / direct   {result['throughput'] / baseline:8.3f}")


if __name__ == "__main__":
    main()
