"""The HTTP service: classify and explain uploaded images, batching concurrent requests.

Every input error is a 4xx JSON `{"error": "..."}` that says what is wrong, and costs only
that request: a body over the size limit (413), a content type other than multipart, JSON or
an image (415), malformed multipart, JSON or base64 (400), bytes that are not an image, an
image cut short, a bad `top_k` or `method` (422), an image that declares more pixels than the
limit (413; checked from its header, before anything is decoded).

Concurrent predictions are queued and run through the model together: one worker takes up to
`max_batch` queued images, waiting at most `max_wait_ms` after the first for more (and only
while other requests are still being read or decoded), and makes one model call. Images are
decoded and preprocessed per request, in a small thread pool, before they are queued; the
model runs on a thread of its own, never two calls at once (explanations run there too).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from vitkit import __version__
from vitkit.config import ViTConfig
from vitkit.data.folder import IMAGE_FORMATS, load_image
from vitkit.infer.labels import top_k as top_k_labels
from vitkit.infer.optimize import OptimizedViT, input_spec, optimize
from vitkit.infer.predict import preprocess
from vitkit.model.vit import ViT, count_params
from vitkit.weights.format import load_model, resolve_model_dir

DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo still fits
DEFAULT_TOP_K = 5
STATIC_DIR = Path(__file__).resolve().parent / "static"
# Decoding threads bound how many uploads are held decoded in memory at once.
_DECODE_WORKERS = min(4, os.cpu_count() or 1)

T = TypeVar("T")


class ApiError(Exception):
    """A request the service refuses: the HTTP status, and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(data: bytes, config: ViTConfig, max_pixels: int) -> torch.Tensor:
    """Uploaded bytes as the model's uint8 (C, S, S) pixels, by `load_image`'s rules.

    Raises `ApiError` for bytes that are not an image of `IMAGE_FORMATS`, an image that
    cannot be decoded (truncated, corrupt), or one that declares more than `max_pixels`.
    """
    if not data:
        raise ApiError(422, "the image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # a size far beyond Pillow's own limit
        raise ApiError(413, f"the image is over the limit of {max_pixels:,} pixels: {e}") from None
    # Pillow's identification and header parsers raise many exception types on bad bytes.
    except Exception:
        raise ApiError(
            422, f"not an image, or not one of the formats read here ({', '.join(IMAGE_FORMATS)})"
        ) from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise ApiError(
                413, f"the image is {w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,}"
            )
        s = config.image_size
        try:
            img.draft(None, (s, s))  # as load_image does for files: JPEGs decode at reduced scale
            return load_image(img, config.in_channels, s, config.interpolation)
        except Image.DecompressionBombError as e:  # e.g. a frame larger than the image
            raise ApiError(413, f"the image is over the pixel limit: {e}") from None
        except Exception as e:
            raise ApiError(422, f"cannot decode the image: {str(e) or type(e).__name__}") from None


def decode_base64(text: str) -> bytes:
    """The bytes of a base64 string (line breaks allowed) or of a `data:...;base64,` URL."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, '"image" is a data: URL that is not base64-encoded')
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f'"image" is not valid base64: {e}') from None


def parse_top_k(value: object) -> int:
    """`top_k` from a query, form or JSON field: a positive integer."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(422, f"top_k must be a positive integer, got {value!r}")
    return value


@dataclass
class _Job:
    inputs: torch.Tensor  # (1, C, S, S), normalised
    k: int
    future: asyncio.Future[list[tuple[str, float]]]


class MicroBatcher:
    """Runs queued images through the model in batches, one batch at a time, on one thread.

    Anything else that uses the model (`call`) runs on the same thread, between batches, so
    the model is never used by two threads at once. Start and stop it inside the event loop.
    """

    def __init__(self, model: ViT | OptimizedViT, max_batch: int, max_wait_ms: float) -> None:
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.batch_sizes: Counter[int] = Counter()  # batch size -> how many batches
        self._device, self._dtype = input_spec(model)
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

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vitkit-model")
        self._task = asyncio.get_running_loop().create_task(self._run(self._queue))

    async def stop(self) -> None:
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

    def submit(self, inputs: torch.Tensor, k: int) -> asyncio.Future[list[tuple[str, float]]]:
        """Queue one preprocessed image (1, C, S, S); the future gets its top-k labels."""
        if not self.running or self._queue is None:
            raise RuntimeError("the batcher is not running; start it in the app's lifespan")
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
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self.batch_sizes[len(jobs)] += 1
            for job, labels in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(labels[: job.k])

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

    def _infer(self, inputs: list[torch.Tensor], k: int) -> list[list[tuple[str, float]]]:
        with torch.inference_mode():
            logits = self.model(torch.cat(inputs).to(self._device, self._dtype))
        return top_k_labels(logits, k, self.model.labels)


class LabelOut(BaseModel):
    label: str
    probability: float


class PredictOut(BaseModel):
    labels: list[LabelOut]
    model: str
    latency_ms: float


class ErrorOut(BaseModel):
    error: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": why}
    for status, why in [
        (400, "malformed multipart, JSON or base64"),
        (413, "body over the size limit, or an image over the pixel limit"),
        (415, "a content type other than multipart/form-data, application/json or image/*"),
        (422, "not a readable image, or a bad parameter"),
    ]
}


def _image_body(**fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of the image endpoints (they parse it themselves)."""
    fields = {"top_k": {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K}, **fields}
    image = "the image file, base64-encoded (a data: URL is accepted too)"
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "description": image}, **fields},
                    }
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


class _Service:
    """One model behind the endpoints: its batcher, its decoding threads, its limits."""

    def __init__(
        self, name: str, batcher: MicroBatcher, max_upload_bytes: int, max_pixels: int
    ) -> None:
        self.name, self.batcher = name, batcher
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self._decoder: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._decoder = ThreadPoolExecutor(_DECODE_WORKERS, thread_name_prefix="vitkit-decode")
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)

    async def decode(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)

    async def read_image(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        """The image bytes of a multipart, JSON or raw-image request, and its other fields."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_upload_bytes:
            raise ApiError(413, f"the body is {int(length):,} bytes, {self._over_limit}")
        body = self._body(request)
        if media == "multipart/form-data":
            try:
                parser = MultiPartParser(request.headers, body, max_files=1, max_fields=8)
                form = await parser.parse()
            except MultiPartException as e:
                raise ApiError(400, f"malformed multipart body: {e.message}") from None
            try:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    # Also what a body cut short in its file part looks like.
                    raise ApiError(422, 'the multipart body has no complete file part "file"')
                data = await upload.read()
                return data, {k: v for k, v in form.items() if isinstance(v, str)}
            finally:
                await form.close()
        if media == "application/json" or media.endswith("+json"):
            raw = b"".join([chunk async for chunk in body])
            try:
                doc = json.loads(raw)
            # RecursionError: JSON nested too deep to parse.
            except (ValueError, RecursionError) as e:
                raise ApiError(400, f"malformed JSON: {e}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
                raise ApiError(
                    422, 'expected a JSON object {"image": "<the image file in base64>", ...}'
                )
            return decode_base64(doc["image"]), doc
        if media.startswith("image/") or media == "application/octet-stream":
            return b"".join([chunk async for chunk in body]), {}
        raise ApiError(
            415,
            f"unsupported content type {media or '(none)'!r}: send multipart/form-data with a "
            'file field "file", application/json {"image": "<base64>"}, or the image bytes '
            "with an image/* type",
        )

    @property
    def _over_limit(self) -> str:
        return f"over the limit of {self.max_upload_bytes:,} bytes"

    async def _body(self, request: Request) -> AsyncIterator[bytes]:
        """The body, chunk by chunk, stopped with a 413 as soon as it passes the limit."""
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise ApiError(413, f"the body is {self._over_limit}")
                yield chunk
        except ClientDisconnect:
            raise ApiError(400, "the client disconnected before sending the whole body") from None


def create_app(
    model_dir_or_model: ViT | str | Path,
    max_batch: int = 32,
    max_wait_ms: float = 5,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    device: str | torch.device = "cpu",
    name: str | None = None,
    precision: str = "fp32",
) -> FastAPI:
    """The service for one model: a `ViT`, a model directory, or a shipped model's name.

    `name` (default: the directory's name, or "model") is reported with every prediction.
    `precision` is that of `vitkit.optimize` for predictions ("auto" in `vitkit serve`);
    explanations always run in fp32.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if max_wait_ms < 0:
        raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
    if max_upload_bytes < 1 or max_pixels < 1:
        raise ValueError("max_upload_bytes and max_pixels must be positive")
    if isinstance(model_dir_or_model, ViT):
        model, name = model_dir_or_model, name or "model"
    else:
        directory = resolve_model_dir(model_dir_or_model)
        model, name = load_model(directory), name or directory.name
    model = model.to(device).eval()
    config = model.config
    fast = optimize(model, precision)
    service = _Service(
        name, MicroBatcher(fast, max_batch, max_wait_ms), max_upload_bytes, max_pixels
    )
    info = {
        "name": name,
        "precision": fast.precision,
        "parameters": count_params(model),
        "config": config.to_dict(),
        "labels": model.labels or [str(i) for i in range(config.num_classes)],
        "preprocessing": {
            "image_size": config.image_size,
            "channels": config.in_channels,
            "mean": list(config.mean),
            "std": list(config.std),
            "interpolation": config.interpolation,
        },
        "limits": {
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": max_pixels,
        },
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="vitkit",
        summary=f"Classify images with the Vision Transformer {name!r}.",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _refused(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.message}, e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{err['loc'][-1]}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"error": "; ".join(problems)}, 422)

    @app.exception_handler(Exception)
    async def _failed(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(e).__name__}); see the log"}, 500)

    def inputs(data: bytes) -> torch.Tensor:
        return preprocess(decode_image(data, config, max_pixels)[None], config)

    @app.post(
        "/v1/predict",
        summary="Classify an image",
        response_model=PredictOut,
        responses=_ERRORS,
        openapi_extra=_image_body(),
    )
    async def predict(
        request: Request,
        top_k: Annotated[int | None, Query(ge=1, description="how many labels")] = None,
    ) -> JSONResponse:
        """The image's most probable labels. Send the image as a multipart upload (field
        `file`), as JSON `{"image": "<base64>"}`, or as the raw bytes with an image/* type;
        `top_k` (default 5) may come in the body or the query."""
        start = time.perf_counter()
        with service.batcher.incoming():
            data, fields = await service.read_image(request)
            k = min(parse_top_k(fields.get("top_k", top_k or DEFAULT_TOP_K)), config.num_classes)
            result = service.batcher.submit(await service.decode(inputs, data), k)
        labels = await result
        return JSONResponse(
            {
                "labels": [{"label": lb, "probability": p} for lb, p in labels],
                "model": name,
                "latency_ms": round((time.perf_counter() - start) * 1000, 3),
            }
        )

    @app.post(
        "/v1/explain",
        summary="Show where the model looked",
        response_class=Response,
        responses={
            200: {
                "description": "the attention overlay as PNG, the top labels in the X-Labels "
                "header (JSON); with format=json, JSON with labels, method, heatmap (the grid, "
                "scaled to [0, 1]), overlay_png (base64), model and latency_ms",
                "content": {"image/png": {}},
            },
            **_ERRORS,
        },
        openapi_extra=_image_body(
            method={"type": "string", "enum": ["rollout", "last-layer", "grad-rollout"]}
        ),
    )
    async def explain(
        request: Request,
        top_k: Annotated[int | None, Query(ge=1, description="how many labels")] = None,
        method: Annotated[str | None, Query(description="default: rollout")] = None,
        fmt: Annotated[Literal["png", "json"], Query(alias="format")] = "png",
    ) -> Response:
        """The attention map over the image, from `vitkit.infer.explain`: the same inputs as
        /v1/predict, plus `method` (default rollout) in the body or the query."""
        from vitkit.infer.explain import METHODS, explain_image

        start = time.perf_counter()
        data, fields = await service.read_image(request)
        k = min(parse_top_k(fields.get("top_k", top_k or DEFAULT_TOP_K)), config.num_classes)
        how = fields.get("method", method or "rollout")
        if how not in METHODS:
            raise ApiError(422, f"method must be one of {', '.join(METHODS)}, got {how!r}")
        pixels = await service.decode(decode_image, data, config, max_pixels)

        def run() -> tuple[list[tuple[str, float]], list[list[float]], bytes]:
            image = Image.fromarray(pixels.permute(1, 2, 0).squeeze(-1).numpy())
            result = explain_image(model, image, how, k)
            png = io.BytesIO()
            result.overlay().save(png, "PNG")
            return result.labels, result.heatmap.round(4).tolist(), png.getvalue()

        labels, heatmap, png = await service.batcher.call(run)
        rows = [{"label": lb, "probability": p} for lb, p in labels]
        latency = round((time.perf_counter() - start) * 1000, 3)
        if fmt == "json":
            return JSONResponse(
                {
                    "labels": rows,
                    "method": how,
                    "heatmap": heatmap,
                    "overlay_png": base64.b64encode(png).decode(),
                    "model": name,
                    "latency_ms": latency,
                }
            )
        # JSON's ASCII escapes keep any label name a valid header value.
        headers = {"X-Labels": json.dumps(rows), "X-Latency-Ms": str(latency)}
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/v1/model", summary="The model: configuration, labels, preprocessing, limits")
    async def model_info() -> dict[str, Any]:
        return info

    @app.get("/v1/stats", summary="How requests have been batched")
    async def stats() -> dict[str, Any]:
        sizes = service.batcher.batch_sizes
        batches, images = sum(sizes.values()), sum(s * n for s, n in sizes.items())
        return {
            "batches": batches,
            "images": images,
            "mean_batch_size": round(images / batches, 3) if batches else None,
            "batch_sizes": {str(s): n for s, n in sorted(sizes.items())},
            "queued": service.batcher.queued,
        }

    @app.get("/healthz", summary="Whether the service can classify")
    async def healthz() -> JSONResponse:
        if not service.batcher.running:
            return JSONResponse({"status": "down", "error": "the model worker has stopped"}, 503)
        return JSONResponse({"status": "ok", "model": name})

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
