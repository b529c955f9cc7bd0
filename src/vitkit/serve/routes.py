"""The endpoints: classify and explain an upload, describe the model, report batching, serve
the page. Each reads the `Service` the app keeps in `app.state.service`.

Images are decoded and preprocessed per request, in a small thread pool, before they are
queued for the batcher. Explanations (an fp32 pass, a backward pass for grad-rollout) run one
at a time on a thread of their own, with one core, so predictions go on meanwhile. A request
that would wait beyond the batcher's queue, or beyond `max_explanations` explanations at once,
gets 503 with Retry-After rather than piling up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from vitkit.data.preprocess import preprocess
from vitkit.infer.explain import METHODS, explain_image
from vitkit.model.vit import ViT
from vitkit.serve.batcher import Answer, Labels, MicroBatcher, QueueFull
from vitkit.serve.decode import (
    DEFAULT_READ_TIMEOUT_S,
    ApiError,
    decode_image,
    parse_top_k,
    read_upload,
)
from vitkit.serve.engine import Engine
from vitkit.serve.schemas import (
    DEFAULT_TOP_K,
    ERRORS,
    EXPLAIN_BODY,
    EXPLAIN_RESPONSES,
    PREDICT_BODY,
    PredictOut,
    label_rows,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Decoding threads bound how many uploads are held decoded in memory at once.
_DECODE_WORKERS = min(4, os.cpu_count() or 1)
# A busy service's answer: the queue drains within about a second under normal load.
_RETRY_AFTER = {"Retry-After": "1"}

T = TypeVar("T")


class Service:
    """One model behind the endpoints: its batcher, its decoding threads, its limits.

    `model` is the fp32 model, for explanations; `batcher.model` the one that predicts.
    `info` is the body of /v1/model.
    """

    def __init__(
        self,
        name: str,
        model: ViT,
        batcher: MicroBatcher,
        max_upload_bytes: int,
        max_pixels: int,
        info: dict[str, Any],
        max_explanations: int = 2,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        self.name, self.model, self.batcher, self.info = name, model, batcher, info
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.read_timeout_s = read_timeout_s
        self.max_explanations = max_explanations
        self._explaining = 0
        self._decoder: ThreadPoolExecutor | None = None
        self._compiling: asyncio.Task[None] | None = None
        self._explainer: ThreadPoolExecutor | None = None

    @property
    def engine(self) -> Engine:
        return cast(Engine, self.batcher.model)

    def start(self) -> None:
        self._decoder = ThreadPoolExecutor(_DECODE_WORKERS, thread_name_prefix="vitkit-decode")
        # torch's thread count is per thread: explanations get one core, predictions the rest.
        self._explainer = ThreadPoolExecutor(
            1, "vitkit-explain", initializer=torch.set_num_threads, initargs=(1,)
        )
        self.batcher.start()
        # Loading (or building) the compiled model must not delay the first answers.
        self._compiling = asyncio.get_running_loop().create_task(self.engine.run())

    async def stop(self) -> None:
        if self._compiling is not None:
            self._compiling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compiling
        await self.engine.stop()
        await self.batcher.stop()
        for pool in (self._decoder, self._explainer):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    async def decode(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a decoding thread."""
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)

    async def explain(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the explanations' thread (the model is only read there, with
        autograd on in that thread alone, so predictions may use it at the same time)."""
        return await asyncio.get_running_loop().run_in_executor(self._explainer, fn, *args)

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """Around one explanation: a 503 when `max_explanations` are running or waiting
        already, as each takes far longer than a batch."""
        if self._explaining >= self.max_explanations:
            raise ApiError(
                503,
                f"{self.max_explanations} explanations are running already; retry shortly",
                _RETRY_AFTER,
            )
        self._explaining += 1
        try:
            yield
        finally:
            self._explaining -= 1

    def submit(self, inputs: torch.Tensor, k: int) -> asyncio.Future[Answer]:
        """Queues the inputs for the batcher; a 503 when its queue is full."""
        try:
            return self.batcher.submit(inputs, k)
        except QueueFull:
            raise _busy(self.batcher) from None

    def inputs(self, data: bytes) -> torch.Tensor:
        """Uploaded bytes as the model's normalised (1, C, S, S) input."""
        config = self.model.config
        return preprocess(decode_image(data, config, self.max_pixels)[None], config)

    def top_k(self, fields: dict[str, Any], query: int | None) -> int:
        """`top_k` from the body's fields, else the query, else the default; at most every class."""
        k = parse_top_k(fields.get("top_k", query or DEFAULT_TOP_K))
        return min(k, self.model.config.num_classes)


def _busy(batcher: MicroBatcher) -> ApiError:
    """The 503 for a request that finds the batcher's queue full."""
    message = f"the service is busy: {batcher.max_queue} images are waiting for the model already"
    return ApiError(503, f"{message}; retry shortly", _RETRY_AFTER)


router = APIRouter()
TopK = Annotated[int | None, Query(ge=1, description="how many labels")]


def _service(request: Request) -> Service:
    return request.app.state.service


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


@router.post(
    "/v1/predict",
    summary="Classify an image",
    response_model=PredictOut,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
)
async def predict(request: Request, top_k: TopK = None) -> JSONResponse:
    """The image's most probable labels. Send the image as a multipart upload (field
    `file`), as JSON `{"image": "<base64>"}`, or as the raw bytes with an image/* type;
    `top_k` (default 5) may come in the body or the query."""
    start = time.perf_counter()
    service = _service(request)
    if service.batcher.full:  # refused before its upload is read: waiting for it buys nothing
        raise _busy(service.batcher)
    with service.batcher.incoming():
        data, fields = await read_upload(request, service.max_upload_bytes, service.read_timeout_s)
        k = service.top_k(fields, top_k)
        result = service.submit(await service.decode(service.inputs, data), k)
    answer = await result
    return JSONResponse(
        {
            "labels": label_rows(answer.labels),
            "model": service.name,
            "mode": answer.mode,
            "latency_ms": _ms_since(start),
        }
    )


@router.post(
    "/v1/explain",
    summary="Show where the model looked",
    response_class=Response,
    responses=EXPLAIN_RESPONSES,
    openapi_extra=EXPLAIN_BODY,
)
async def explain(
    request: Request,
    top_k: TopK = None,
    method: Annotated[str | None, Query(description="default: rollout")] = None,
    fmt: Annotated[Literal["png", "json"], Query(alias="format")] = "png",
) -> Response:
    """The attention map over the image, from `vitkit.infer.explain`: the same inputs as
    /v1/predict, plus `method` (default rollout) in the body or the query."""
    start = time.perf_counter()
    service = _service(request)
    with service.explaining():
        data, fields = await read_upload(request, service.max_upload_bytes, service.read_timeout_s)
        k = service.top_k(fields, top_k)
        how = fields.get("method", method or "rollout")
        if how not in METHODS:
            raise ApiError(422, f"method must be one of {', '.join(METHODS)}, got {how!r}")
        config, limit = service.model.config, service.max_pixels
        pixels = await service.decode(decode_image, data, config, limit)
        labels, heatmap, png = await service.explain(_explain, service.model, pixels, how, k)
    rows, latency = label_rows(labels), _ms_since(start)
    if fmt == "json":
        return JSONResponse(
            {
                "labels": rows,
                "method": how,
                "heatmap": heatmap,
                "overlay_png": base64.b64encode(png).decode(),
                "model": service.name,
                "latency_ms": latency,
            }
        )
    # JSON's ASCII escapes keep any label name a valid header value.
    headers = {"X-Labels": json.dumps(rows), "X-Latency-Ms": str(latency)}
    return Response(png, media_type="image/png", headers=headers)


def _explain(
    model: ViT, pixels: torch.Tensor, how: str, k: int
) -> tuple[Labels, list[list[float]], bytes]:
    """The top-k labels, the heatmap and the overlay as PNG, for uint8 (C, S, S) pixels (as
    decoded and cropped already: a tensor, so that they are not cropped again)."""
    result = explain_image(model, pixels, how, k)
    png = io.BytesIO()
    result.overlay().save(png, "PNG")
    return result.labels, result.heatmap.round(4).tolist(), png.getvalue()


@router.get("/v1/model", summary="The model: configuration, labels, preprocessing, limits")
async def model_info(request: Request) -> dict[str, Any]:
    service = _service(request)
    engine = service.engine
    compiled = engine.compiled
    precision = compiled.precision if compiled else engine.eager.precision
    return {**service.info, "precision": precision, "mode": engine.mode}


@router.get("/v1/stats", summary="How requests have been batched")
async def stats(request: Request) -> dict[str, Any]:
    batcher = _service(request).batcher
    sizes = batcher.batch_sizes
    batches, images = sum(sizes.values()), sum(s * n for s, n in sizes.items())
    return {
        "batches": batches,
        "images": images,
        "mean_batch_size": round(images / batches, 3) if batches else None,
        "batch_sizes": {str(s): n for s, n in sorted(sizes.items())},
        "queued": batcher.queued,
    }


@router.get("/healthz", summary="Whether the service can classify")
async def healthz(request: Request) -> JSONResponse:
    service = _service(request)
    if not service.batcher.running:
        return JSONResponse({"status": "down", "error": "the model worker has stopped"}, 503)
    return JSONResponse({"status": "ok", "model": service.name})


@router.get("/readyz", summary="Which mode serves each batch size; whether compiling is done")
async def readyz(
    request: Request,
    full_speed: Annotated[
        bool, Query(description="answer 503 until the compiled model serves")
    ] = False,
) -> JSONResponse:
    """200 when the service answers predictions (from the eager model at first; `mode` says
    which). With `full_speed=true`, 503 until a compiled model serves, for a load balancer
    that should send traffic only then."""
    service = _service(request)
    status = service.engine.status()
    ready = service.batcher.running and (not full_speed or service.engine.compiled is not None)
    return JSONResponse({"ready": ready, "model": service.name, **status}, 200 if ready else 503)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")
