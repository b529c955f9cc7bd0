"""Model throughput of the eager model against its compiled packages, per precision, at the
batch sizes a service runs (what `vitkit serve --precision auto` measures to choose).

    .venv/bin/python bench/compiled_speed.py                          # shipped model
    .venv/bin/python bench/compiled_speed.py --model /tmp/s16 --precisions fp32 int8

Packages come from vitkit's cache (built there first if missing, as `vitkit optimize` does);
int8 needs a model that carries calibration images. Each figure is the best of three
measurements, in images/s.
"""

from __future__ import annotations

import argparse

from vitkit.infer.compiled import build_compiled, cache_dir, images_per_second, private_dir
from vitkit.infer.optimize import optimize
from vitkit.runtime import cpu_flags, fast_precisions
from vitkit.weights.format import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    a = p.parse_args()
    model = load_model(a.model)
    sizes = sorted({1, a.max_batch})
    eager = "bf16" if "bf16" in fast_precisions("cpu") else "fp32"
    runs = {f"eager-{eager}": optimize(model, eager)}
    for precision in a.precisions:
        built = build_compiled(model, precision, a.max_batch, private_dir(cache_dir()), print)
        assert built.run is not None
        runs[f"compiled-{precision}"] = built.run
    amx = "AMX" if "amx_int8" in cpu_flags() else "no AMX"
    print(f"{a.model}: images/s ({amx}; fast precisions here: {fast_precisions('cpu') or 'none'})")
    base = {
        n: max(images_per_second(runs[f"eager-{eager}"], model, n) for _ in range(3)) for n in sizes
    }
    for name, run in runs.items():
        speeds = {n: max(images_per_second(run, model, n) for _ in range(3)) for n in sizes}
        cells = "  ".join(
            f"batch {n}: {v:8.1f} ({v / base[n]:.2f}x eager)" for n, v in speeds.items()
        )
        print(f"  {name:16s} {cells}")


if __name__ == "__main__":
    main()
