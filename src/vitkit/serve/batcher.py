"""Micro-batching: concurrent requests' images go through the model together.

One worker takes up to `max_batch` queued images, waiting at most `max_wait_ms` after the
first for more (and only while other requests are still being read or decoded, so an idle
service answers at once), and makes one model call. The model runs on a thread of its own,
never two calls at once; anything else that needs the model runs there too, between batches.
Each answer carries the mode that computed it (`Engine.predict`'s second value). A job
asking for no labels (k = 0) gets the model's output row instead: a CLIP's image embedding.
At most `max_queue` images wait: beyond that `submit` refuses with `QueueFull`. When a batch's
model call fails, each of its images is retried alone, so one bad input fails only itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import torch

from vitkit.infer.labels import top_k as top_k_labels

T = TypeVar("T")
Labels = list[tuple[str, float]]


class Answer(NamedTuple):
    labels: Labels  # top-k (label, probability), most probable first
    mode: str  # what computed them, e.g. "eager-fp32" or "compiled-int8"
    output: torch.Tensor | None = None  # the model's output row (fp32), for k = 0 only


class Predictor(Protocol):
    """What the batcher runs: `vitkit.serve.engine.Engine`, or anything with its interface."""

    labels: list[str] | None

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, str]: ...

    def input_spec(self) -> tuple[torch.device, torch.dtype]: ...


class QueueFull(Exception):
    """The queue holds `max_queue` images already: the request is refused, not queued."""


@dataclass
class _Job:
    inputs: torch.Tensor  # (1, C, S, S), normalised
    k: int
    future: asyncio.Future[Answer]


class MicroBatcher:
    """Runs queued images through the model in batches, one batch at a time, on one thread.

    Anything else that uses the model (`call`) runs on the same thread, between batches, so
    the model is never used by two threads at once. Start and stop it inside the event loop.
    """

    def __init__(
        self,
        model: Predictor,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int | None = None,
    ) -> None:
        """`max_queue` (default 8 * max_batch): the most images waiting for a batch."""
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.max_queue = 8 * max_batch if max_queue is None else max_queue
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        self.batch_sizes: Counter[int] = Counter()  # batch size -> how many batches
        self._device, self._dtype = model.input_spec()
        self._queue: asyncio.Queue[_Job] | None = None
        self._incoming = 0  # requests being read or decoded, on their way to the queue
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def full(self) -> bool:
        """Whether `submit` would refuse an image now: `max_queue` are waiting."""
        return self._queue is not None and self._queue.full()

    def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vitkit-model")
        self._task = asyncio.get_running_loop().create_task(self._run(self._queue))

    async def stop(self) -> None:
        """Stops the worker, after the last request has been answered: images still queued
        are dropped unanswered."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Around reading and decoding a request that will be submitted: a batch waits for
        more images (up to max_wait) only while such requests are on their way."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    def submit(self, inputs: torch.Tensor, k: int) -> asyncio.Future[Answer]:
        """Queue one preprocessed image (1, C, S, S); the future gets its top-k labels and
        the mode that computed them (k = 0: no labels, the model's output row instead).

        Raises `QueueFull` when `max_queue` images are waiting already.
        """
        if not self.running or self._queue is None:
            raise RuntimeError("the batcher is not running; start it in the app's lifespan")
        if self._queue.full():
            raise QueueFull(f"{self.max_queue} images are waiting for the model already")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(inputs, k, future))
        return future

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the model's thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self, queue: asyncio.Queue[_Job]) -> None:
        while True:
            jobs = [job for job in await self._collect(queue) if not job.future.done()]
            if not jobs:  # every client in this batch has gone away
                continue
            try:
                k = max(job.k for job in jobs)
                results = await self.call(self._infer, [job.inputs for job in jobs], k)
            except Exception as e:  # a failed model call fails its requests, not the service
                if len(jobs) == 1:
                    _answer(jobs[0], e)
                else:  # one bad input should not fail the others: each is retried alone
                    await self._run_singly(jobs)
                continue
            self.batch_sizes[len(jobs)] += 1
            for job, answer in zip(jobs, results, strict=True):
                _answer(job, answer)

    async def _run_singly(self, jobs: list[_Job]) -> None:
        """Each job in a model call of its own: only those whose own call fails get its error."""
        for job in jobs:
            if job.future.done():
                continue
            try:
                answer = (await self.call(self._infer, [job.inputs], job.k))[0]
            except Exception as e:
                _answer(job, e)
                continue
            self.batch_sizes[1] += 1
            _answer(job, answer)

    async def _collect(self, queue: asyncio.Queue[_Job]) -> list[_Job]:
        """The next batch: the first job to arrive, and those that follow within max_wait
        (no wait when no other request is on its way: an idle server answers at once)."""
        loop = asyncio.get_running_loop()
        jobs = [await queue.get()]
        deadline = loop.time() + self.max_wait
        while len(jobs) < self.max_batch:
            if not queue.empty():
                jobs.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or not self._incoming:
                break
            try:
                jobs.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return jobs

    def _infer(self, inputs: list[torch.Tensor], k: int) -> list[Answer]:
        with torch.inference_mode():
            logits, mode = self.model.predict(torch.cat(inputs).to(self._device, self._dtype))
            rows = logits.float().cpu()
        if k < 1:  # every job asks for the output rows only
            return [Answer([], mode, row) for row in rows]
        labels = top_k_labels(logits, k, self.model.labels)
        return [Answer(top, mode, row) for top, row in zip(labels, rows, strict=True)]


def _answer(job: _Job, result: Answer | Exception) -> None:
    """Gives the job its answer (its own top k; the output row for k = 0) or its exception,
    unless its client has gone away."""
    if job.future.done():
        return
    if isinstance(result, Exception):
        job.future.set_exception(result)
    else:
        output = result.output if job.k < 1 else None
        job.future.set_result(Answer(result.labels[: job.k], result.mode, output))
