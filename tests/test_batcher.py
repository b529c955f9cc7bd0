"""The micro-batcher on its own: batch sizes, waiting, order, failures, its thread, stopping."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from vitkit import create_model
from vitkit.infer.labels import top_k
from vitkit.model.vit import ViT
from vitkit.serve.batcher import Answer, MicroBatcher, QueueFull
from vitkit.serve.engine import Engine


@pytest.fixture
def model() -> ViT:
    model = create_model("Ti/4@28", width=64, depth=2, heads=2, seed=0)
    # The initial zero head predicts uniformly; random weights give distinct probabilities.
    torch.nn.init.normal_(model.head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    return model.eval()


def images(n: int) -> list[torch.Tensor]:
    """n distinct normalised (1, 1, 28, 28) inputs."""
    g = torch.Generator().manual_seed(n)
    return [torch.randn(1, 1, 28, 28, generator=g) for _ in range(n)]


class Spy:
    """Stands in for a model's forward: records each call's batch size and thread, and can fail
    the first call, fail every call with a NaN input, or hold every call until released."""

    def __init__(
        self, model: ViT, fail_first: bool = False, hold: bool = False, fail_nan: bool = False
    ) -> None:
        self.fail_nan = fail_nan
        self.forward, self.fail_first = model.forward, fail_first
        self.sizes: list[int] = []
        self.threads: list[str] = []
        self.release = threading.Event()
        if not hold:
            self.release.set()
        model.forward = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(threading.current_thread().name)
        self.sizes.append(len(x))
        self.release.wait(30)
        if self.fail_first and len(self.sizes) == 1:
            raise RuntimeError("out of memory")
        if self.fail_nan and x.isnan().any():
            raise ValueError("NaN in the input")
        return self.forward(x)


def assert_same(got: Answer, want: list[tuple[str, float]]) -> None:
    assert got.mode == "eager-fp32"
    assert [label for label, _ in got.labels] == [label for label, _ in want]
    np.testing.assert_allclose([p for _, p in got.labels], [p for _, p in want], atol=1e-5)


def test_full_batches_keep_each_request_its_own_answer(model):
    xs, ks = images(5), [3, 1, 5, 2, 3]
    with torch.inference_mode():
        want = [top_k(model(x), k, model.labels)[0] for x, k in zip(xs, ks, strict=True)]
    spy = Spy(model)
    batcher = MicroBatcher(Engine(model, "fp32", 2), max_batch=2, max_wait_ms=1000)

    async def test():
        batcher.start()
        futures = [batcher.submit(x, k) for x, k in zip(xs, ks, strict=True)]
        assert batcher.queued == 5
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return results

    results = asyncio.run(test())
    # Everything was queued at once: batches of max_batch, no waiting for the last one.
    assert spy.sizes == [2, 2, 1]
    assert batcher.batch_sizes == {2: 2, 1: 1}
    for got, wanted, k in zip(results, want, ks, strict=True):
        assert len(got.labels) == k
        assert_same(got, wanted)


def test_an_idle_batcher_does_not_wait(model):
    spy = Spy(model)
    batcher = MicroBatcher(Engine(model, "fp32", 8), max_batch=8, max_wait_ms=10_000)

    async def test():
        batcher.start()
        start = time.perf_counter()
        await batcher.submit(images(1)[0], 1)
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return elapsed

    assert asyncio.run(test()) < 5  # far less than max_wait: no other request was on its way
    assert spy.sizes == [1]


def test_a_batch_waits_for_requests_on_their_way(model):
    spy = Spy(model)
    batcher = MicroBatcher(Engine(model, "fp32", 2), max_batch=2, max_wait_ms=10_000)
    first, second = images(2)

    async def test():
        batcher.start()
        start = time.perf_counter()
        with batcher.incoming():  # a second request is being read
            result = batcher.submit(first, 1)
            await asyncio.sleep(0.1)
            other = batcher.submit(second, 1)
        await asyncio.gather(result, other)
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return elapsed

    elapsed = asyncio.run(test())
    assert spy.sizes == [2]  # the first image waited for the second
    assert 0.1 <= elapsed < 5  # and the full batch went at once, long before max_wait


def test_a_batch_waits_no_longer_than_max_wait(model):
    spy = Spy(model)
    batcher = MicroBatcher(Engine(model, "fp32", 8), max_batch=8, max_wait_ms=200)

    async def test():
        batcher.start()
        start = time.perf_counter()
        with batcher.incoming():  # a request that never arrives
            await batcher.submit(images(1)[0], 1)
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return elapsed

    assert 0.19 <= asyncio.run(test()) < 5
    assert spy.sizes == [1]


def test_a_failed_batch_is_retried_one_image_at_a_time(model):
    spy = Spy(model, fail_first=True)
    batcher = MicroBatcher(Engine(model, "fp32", 2), max_batch=2, max_wait_ms=0)

    async def test():
        batcher.start()
        futures = [batcher.submit(x, 2) for x in images(3)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        running = batcher.running
        await batcher.stop()
        return results, running

    results, running = asyncio.run(test())
    # A failure that was the batch's, not an image's: every request is answered after all.
    assert all(isinstance(r, Answer) and len(r.labels) == 2 for r in results)
    assert running and spy.sizes == [2, 1, 1, 1]
    assert batcher.batch_sizes == {1: 3}  # the failed batch is not counted


def test_a_bad_input_fails_only_its_own_request(model):
    good, other = images(2)
    bad = torch.full_like(good, float("nan"))
    with torch.inference_mode():
        want = [top_k(model(x), 2, model.labels)[0] for x in (good, other)]
    spy = Spy(model, fail_nan=True)
    batcher = MicroBatcher(Engine(model, "fp32", 3), max_batch=3, max_wait_ms=0)

    async def test():
        batcher.start()
        futures = [batcher.submit(x, 2) for x in (good, bad, other)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        return results

    a, b, c = asyncio.run(test())
    assert isinstance(b, ValueError) and "NaN" in str(b)
    assert_same(a, want[0])
    assert_same(c, want[1])
    assert spy.sizes == [3, 1, 1, 1]  # the batch, then each image alone


def test_a_full_queue_refuses_instead_of_queueing(model):
    spy = Spy(model, hold=True)
    batcher = MicroBatcher(Engine(model, "fp32", 1), max_batch=1, max_wait_ms=0, max_queue=2)

    async def test():
        batcher.start()
        xs = images(5)
        first = batcher.submit(xs[0], 1)
        for _ in range(500):  # the first image is in the model, held there
            if spy.threads:
                break
            await asyncio.sleep(0.01)
        queued = [batcher.submit(x, 1) for x in xs[1:3]]
        for x in xs[3:]:
            with pytest.raises(QueueFull, match="2 images"):
                batcher.submit(x, 1)
        assert batcher.queued == 2
        spy.release.set()
        results = await asyncio.gather(first, *queued)
        again = await batcher.submit(xs[3], 1)  # room again once the queue drains
        await batcher.stop()
        return results, again

    try:
        results, again = asyncio.run(test())
    finally:
        spy.release.set()
    assert len(results) == 3 and len(again.labels) == 1
    assert spy.sizes == [1, 1, 1, 1]
    assert MicroBatcher(Engine(model, "fp32", 4), max_batch=4, max_wait_ms=0).max_queue == 32
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(Engine(model, "fp32", 4), max_batch=4, max_wait_ms=0, max_queue=0)


def test_requests_gone_away_are_not_computed(model):
    spy = Spy(model)
    batcher = MicroBatcher(Engine(model, "fp32", 8), max_batch=8, max_wait_ms=0)

    async def test():
        batcher.start()
        futures = [batcher.submit(x, 1) for x in images(3)]
        futures[1].cancel()  # its client disconnected
        done = await asyncio.gather(futures[0], futures[2])
        await batcher.stop()
        return done

    assert len(asyncio.run(test())) == 2
    assert spy.sizes == [2] and batcher.batch_sizes == {2: 1}


def test_calls_share_the_model_thread(model):
    spy = Spy(model)
    batcher = MicroBatcher(Engine(model, "fp32", 8), max_batch=8, max_wait_ms=0)

    async def test():
        batcher.start()
        await batcher.submit(images(1)[0], 1)
        name = await batcher.call(lambda: threading.current_thread().name)
        total = await batcher.call(sum, [1, 2, 3])
        await batcher.stop()
        return name, total

    name, total = asyncio.run(test())
    assert total == 6
    assert name.startswith("vitkit-model") and spy.threads == [name]


def test_stop_ends_the_worker(model):
    spy = Spy(model, hold=True)
    batcher = MicroBatcher(Engine(model, "fp32", 1), max_batch=1, max_wait_ms=0)

    async def test():
        assert not batcher.running and batcher.queued == 0
        await batcher.stop()  # before start: nothing to stop
        with pytest.raises(RuntimeError, match="not running"):
            batcher.submit(images(1)[0], 1)
        batcher.start()
        assert batcher.running
        for x in images(3):
            batcher.submit(x, 1)
        while not spy.threads:  # the first batch is in the model; the other two wait
            await asyncio.sleep(0.01)
        assert batcher.queued == 2
        start = time.perf_counter()
        await batcher.stop()  # does not wait for the model call in progress
        stopped_in = time.perf_counter() - start
        spy.release.set()
        assert not batcher.running
        with pytest.raises(RuntimeError, match="not running"):
            batcher.submit(images(1)[0], 1)
        with pytest.raises(RuntimeError):  # nor does the model thread take new work
            await batcher.call(sum, [1])
        return stopped_in

    try:
        assert asyncio.run(test()) < 5
    finally:
        spy.release.set()
    assert batcher.batch_sizes == {}
