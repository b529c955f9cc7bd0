"""What computes the service's predictions: the eager model from the first request, a
compiled package from the moment one is ready.

At start-up the service looks for a package built for this model, precision, batch range,
torch and CPU (in vitkit's cache, or in the directory named by `compiled_dir`); when one is
there it serves at full speed at once. Otherwise it answers with the eager model (fp32, or
bf16 where the CPU runs bf16 fast) while `vitkit optimize --background` builds the package in
a separate process at the lowest CPU priority: inductor's compile is mostly Python and would
hold this process's interpreter lock, and its global settings, if it ran in a thread here.
When the package is built it is loaded and warmed up off the model's thread, then swapped
in between two batches, so no request is dropped and every answer names the mode that
computed it ("eager-fp32", "compiled-int8", ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vitkit.infer.compiled import (
    Compiled,
    StalePackage,
    cache_dir,
    find_compiled,
    holds_gil,
    private_dir,
)
from vitkit.infer.optimize import optimize
from vitkit.model.vit import ViT
from vitkit.runtime import fast_precisions, resolve_precision
from vitkit.weights.format import one_line, save_model

log = logging.getLogger("vitkit.serve")
# A compiled model's call holds Python's interpreter lock until it returns (AOTInductor's
# runner does not release it), so the event loop cannot answer anything meanwhile: batches are
# split into calls that each take at most about this long (measured when the package loads).
MAX_STALL_S = 0.05
# Lines of the background build's output kept for /readyz when it fails.
_TAIL_LINES = 5


class Engine:
    """Predictions for the batcher: `predict` runs on the model's thread only."""

    def __init__(
        self,
        model: ViT,
        precision: str,
        max_batch: int,
        *,
        compile: bool = False,
        compiled_dir: Path | None = None,
        source_dir: Path | None = None,
    ) -> None:
        """`precision` as in `vitkit.optimize` ("auto": measured when compiled). `compile`:
        build the package in the background when none is found. `compiled_dir`: where a
        package made by `vitkit optimize --out` lies (default: vitkit's cache).
        `source_dir`: the model's directory, for the background build (else a copy is
        written)."""
        self.model, self.max_batch, self.precision = model, max_batch, precision
        device = next(model.parameters()).device
        self.compilable = device.type == "cpu"
        wanted = resolve_precision(precision, device)
        eager = "bf16" if wanted != "fp32" and "bf16" in fast_precisions(device) else "fp32"
        self.eager = optimize(model, eager)
        self.labels = model.labels
        self.compiled: Compiled | None = None
        self.chunk = max_batch  # the most images per compiled call, see MAX_STALL_S
        self.why: str | None = None  # why the mode serving now was chosen, once measured
        self._want_compile = compile and self.compilable
        self._compiled_dir, self._source_dir = compiled_dir, source_dir
        self.state = "loading" if self.compilable else "off"
        self.detail = "" if self.compilable else "compiled packages run on CPUs only"
        self.started = time.monotonic()
        self.ready_seconds: float | None = None
        self._process: asyncio.subprocess.Process | None = None

    # -- on the model's thread --------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Logits for normalised fp32 images, and the mode that computed them."""
        compiled = self.compiled  # read once: a swap between here and the return is harmless
        if compiled is None:
            return self.eager(x), self.eager_mode
        run = compiled.run
        assert run is not None  # only packages are swapped in
        with torch.inference_mode():
            logits = torch.cat([run(c) for c in x.split(self.chunk)])
        return logits, f"compiled-{compiled.precision}"

    def input_spec(self) -> tuple[torch.device, torch.dtype]:
        return self.eager.input_spec()

    # -- what it serves -----------------------------------------------------------------------
    @property
    def eager_mode(self) -> str:
        return f"eager-{self.eager.precision}"

    @property
    def mode(self) -> str:
        compiled = self.compiled
        return f"compiled-{compiled.precision}" if compiled else self.eager_mode

    def status(self) -> dict[str, Any]:
        """The body of /readyz: which mode serves which batch sizes, and the compile's state."""
        compiled = self.compiled
        return {
            "mode": self.mode,
            "batch_sizes": {f"1-{self.max_batch}": self.mode},
            "images_per_call": self.chunk if compiled else self.max_batch,
            "compile": {
                "state": self.state,
                "precision": compiled.precision if compiled else None,
                "why": self.why,
                "detail": self.detail or None,
                "seconds_to_full_speed": self.ready_seconds,
            },
        }

    # -- the background work --------------------------------------------------------------------
    async def run(self) -> None:
        """Load a package if one is ready, else build one in the background, then swap it in.

        Every failure leaves the eager model serving and is reported in `status`."""
        if not self.compilable:
            return
        try:
            directory = self._compiled_dir or private_dir(cache_dir())
            if not await self._load(directory):
                if not self._want_compile:
                    self.state, self.detail = "off", "no compiled package; eager serves"
                    return
                await self._build(directory)
                if not await self._load(directory):
                    return
        except Exception as e:  # the service keeps its eager model whatever happens here
            self.state, self.detail = "failed", one_line(f"{type(e).__name__}: {e}")
            log.warning("compiling failed, the eager model serves: %s", self.detail)

    async def _load(self, directory: Path) -> bool:
        """Loads, warms up and swaps in the package for this model in `directory`, if any."""
        try:
            compiled = await asyncio.to_thread(self._find_and_warm, directory)
        except StalePackage as e:
            if self.state == "compiling":  # built, yet not loadable: report, keep eager
                self.state, self.detail = "failed", str(e)
            else:
                log.info("no compiled package ready: %s", e)
            return False
        self.state, self.why = "done", compiled.why
        self.ready_seconds = round(time.monotonic() - self.started, 1)
        if compiled.run is None:  # measured: no compiled model pays here
            log.info("%s serves: %s", self.eager_mode, compiled.why)
            return True
        self.compiled = compiled
        log.info("now serving %s (%s), from %s", self.mode, compiled.why, compiled.path)
        return True

    def _find_and_warm(self, directory: Path) -> Compiled:
        compiled = find_compiled(self.model, self.precision, self.max_batch, directory)
        if compiled.run is None:
            return compiled
        c = self.model.config
        if not holds_gil(compiled.precision):  # the event loop runs during its calls
            compiled.run(torch.zeros(1, c.in_channels, c.image_size, c.image_size))
            self.chunk = self.max_batch
            return compiled
        # Batches of 1, 2, 4, ... until a call takes MAX_STALL_S: that sets the chunk size, and
        # no client's request pays for a first call's allocations. Each warm-up call stalls the
        # event loop no longer than a chunk will.
        size, chunk = 1, 1
        while size <= self.max_batch:
            start = time.perf_counter()
            compiled.run(torch.zeros(size, c.in_channels, c.image_size, c.image_size))
            if time.perf_counter() - start > MAX_STALL_S:
                break
            chunk, size = size, 2 * size
        self.chunk = chunk
        return compiled

    async def _build(self, directory: Path) -> None:
        """`vitkit optimize --background` in a child process, its output relayed to the log."""
        self.state = "compiling"
        with self._model_dir() as source:
            command = [
                *(sys.executable, "-m", "vitkit", "optimize", str(source)),
                *("--precision", self.precision, "--max-batch", str(self.max_batch)),
                *("--out", str(directory), "--background"),
            ]
            log.info(
                "compiling %s in the background; the eager model serves meanwhile", self.precision
            )
            self._process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            tail: list[str] = []
            assert self._process.stderr is not None
            async for raw in self._process.stderr:
                line = raw.decode(errors="replace").rstrip()
                if line.startswith("vitkit optimize:"):
                    log.info("%s", line.removeprefix("vitkit optimize: "))
                tail = [*tail, line][-_TAIL_LINES:]
            code = await self._process.wait()
        if code != 0:
            last = next((t for t in reversed(tail) if t.strip()), f"exit status {code}")
            raise RuntimeError(f"the background compile failed: {last}")

    @contextlib.contextmanager
    def _model_dir(self) -> Iterator[Path]:
        """The model's directory, or a temporary copy of a model given as an object."""
        if self._source_dir is not None:
            yield self._source_dir
            return
        copy = Path(tempfile.mkdtemp(prefix="vitkit-model-"))
        try:
            yield save_model(self.model, copy)
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    async def stop(self) -> None:
        """Ends a background build still running."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
