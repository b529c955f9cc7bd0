"""Start-up and memory of training on a folder of photos: does memory stay flat as the
collection grows, and how soon does the first step come?

    python bench/stream_startup.py --images 10000 30000

For each size, a folder of ImageNet-like photos (500x375 JPEG, 10 classes, written once into
--root) is trained on with `vitkit train --data DIR --model Ti/16 --max-steps 3 --batch-size
32` (no other flag: the run picks in-memory or streamed itself), and the time to the end of
its first step, the wall time in all and the peak memory of the whole process tree (the
trainer and its decoding workers: their PSS summed, sampled every 0.1 s) are printed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Distinct photos written; larger folders repeat them (see `write_photos`).
UNIQUE = 30_000


def write_photos(root: Path, count: int) -> Path:
    """`count` 500x375 JPEGs in 10 class folders (kept between runs). Beyond `UNIQUE` photos,
    the files are hard links to the first ones, cycling: what is measured is listing,
    streaming and memory, which do not depend on the pixels; and the disk holds only those."""
    folder = root / f"photos-{count}"
    done = folder / ".complete"
    if done.exists():
        return folder
    if count > UNIQUE:
        first = write_photos(root, UNIQUE)
        for i in range(count):
            name = f"class{i % 10}/{i:06d}.jpg"
            (folder / f"class{i % 10}").mkdir(parents=True, exist_ok=True)
            if not (folder / name).exists():
                os.link(first / f"class{i % 10}/{i % UNIQUE:06d}.jpg", folder / name)
        done.touch()
        return folder
    rng = np.random.default_rng(0)
    # A few base pictures, shifted and noised per file: real JPEG sizes, quick to write.
    bases = [rng.integers(0, 256, (375 // 15, 500 // 20, 3), dtype=np.uint8) for _ in range(10)]
    for i in range(count):
        label = i % 10
        small = np.roll(bases[label], i % 7, axis=1)
        big = Image.fromarray(small).resize((500, 375), Image.Resampling.BILINEAR)
        noise = rng.integers(0, 24, (375, 500, 3), dtype=np.uint8)
        pixels = np.clip(np.asarray(big, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"class{label}" / f"{i:06d}.jpg", quality=85)
    done.touch()
    return folder


def tree_memory(pid: int) -> int:
    """Proportional set size (PSS) of `pid` and all its descendants (Linux /proc): resident
    bytes with each page shared by n processes counted 1/n, so that forked decoding workers,
    which share most of the trainer's pages, are not counted as whole copies of it."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (OSError, ValueError):
            continue
        stack += [int(c) for c in children]
    return total


def run(folder: Path, val_fraction: float | None = None) -> tuple[float, float, int]:
    """(seconds to the end of the first step, seconds in all, peak memory) of the command on
    `folder`, timed from the process's start: its progress bar says when step 1 is done."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "vitkit", "train", "--data", str(folder)]
        command += ["--model", "Ti/16", "--max-steps", "3", "--batch-size", "32"]
        command += ["--out", str(Path(out) / "run")]
        if val_fraction is not None:  # a shorter evaluation at the end; start-up is the same
            command += ["--val-fraction", str(val_fraction)]
        start, peak, first = time.perf_counter(), 0, []
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def watch() -> None:
            seen = b""
            while chunk := proc.stderr.read1(4096):
                seen = seen[-200:] + chunk
                if not first and re.search(rb"\| +1/\d+ \[", seen):
                    first.append(time.perf_counter() - start)

        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        while proc.poll() is None:
            peak = max(peak, tree_memory(proc.pid))
            time.sleep(0.1)
        reader.join()
        if proc.returncode or not first:
            raise SystemExit(f"vitkit train failed with exit code {proc.returncode}")
        return first[0], time.perf_counter() - start, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[10000, 30000])
    p.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "vitkit-photos")
    p.add_argument(
        "--val-fraction",
        type=float,
        help="held out (default: the command's 10%%): keeps the run's final evaluation short",
    )
    args = p.parse_args()
    results = []
    for count in args.images:
        folder = write_photos(args.root, count)
        first, seconds, peak = run(folder, args.val_fraction)
        results.append((count, seconds, peak))
        print(
            f"{count:,} photos: first step after {first:.1f} s, {seconds:.1f} s in all, "
            f"peak memory {peak / 2**30:.2f} GiB",
            flush=True,
        )
    if len(results) > 1:
        base = results[0][2]
        for count, _, peak in results[1:]:
            print(f"peak memory at {count:,} / at {results[0][0]:,}: {peak / base:.2f}x")


if __name__ == "__main__":
    main()
