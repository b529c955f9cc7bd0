"""The HTTP service: classify and explain uploaded images, batching concurrent requests; with
a CLIP, classify them by labels given as text, and embed images and texts.

`create_app` puts the parts together: the upload's decoding and limits (`decode`), the
micro-batcher (`batcher`), the endpoints (`routes`) and their OpenAPI descriptions
(`schemas`). Every error is JSON `{"error": "..."}`; bad input is a 4xx that costs only its
own request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from vitkit import __version__
from vitkit.infer.zero_shot import load_tokenizer
from vitkit.model.vit import ViT
from vitkit.serve.auth import add_access_control, check_access
from vitkit.serve.batcher import MicroBatcher
from vitkit.serve.decode import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_READ_TIMEOUT_S,
    ApiError,
    default_max_pixels,
)
from vitkit.serve.engine import Engine
from vitkit.serve.routes import STATIC_DIR, Service, router
from vitkit.serve.schemas import model_info
from vitkit.serve.text import (
    CACHE_ENTRIES,
    DEFAULT_MAX_ENCODINGS,
    DEFAULT_MAX_PROMPTS,
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    Slots,
    TextSide,
)
from vitkit.weights.clip import is_clip, load_clip
from vitkit.weights.format import load_model, resolve_model_dir

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_UPLOAD_BYTES", "create_app"]


def create_app(
    model_dir_or_model: ViT | str | Path,
    max_batch: int = 32,
    max_wait_ms: float = 5,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    *,
    max_queue: int | None = None,
    max_explanations: int = 2,
    allowed_hosts: list[str] | None = None,
    device: str | torch.device = "cpu",
    name: str | None = None,
    precision: str = "fp32",
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    compile: bool = False,
    compiled_dir: str | Path | None = None,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    max_encodings: int = DEFAULT_MAX_ENCODINGS,
) -> FastAPI:
    """The service for one model: a `ViT`, a model directory, or a shipped model's name.

    `name` (default: the directory's name, or "model") is reported with every prediction.
    `precision` is that of `vitkit.optimize` for predictions ("auto" in `vitkit serve`);
    explanations always run in fp32. A compiled package for the model, precision, batch
    range and CPU (in vitkit's cache, or in `compiled_dir`) serves as soon as it is loaded;
    with `compile`, one is built in the background where there is none, the eager model
    serving meanwhile (see `vitkit.serve.engine`).

    Beyond `max_queue` images waiting for the model (default 8 * max_batch), or
    `max_explanations` explanations at once, a request gets 503 with Retry-After.
    `allowed_hosts` (default: any) are the Host header values accepted, with any port; others
    get 400. The `Service` is `app.state.service`. `max_pixels` (default: by the model's input
    size, `default_max_pixels`) is the largest image, by its declared size.

    With `api_key`, requests other than the page, its files, the health checks and the API's
    description need `Authorization: Bearer API_KEY` (else 401); `cors_origins` are the web
    origins whose pages may call the API (none by default). An upload that has not all
    arrived `read_timeout_s` after its reading began gets 408.

    A CLIP directory (`vitkit.weights.clip.is_clip`) serves its image tower as above and
    loads its text tower too, for /v1/zero-shot (at most `max_prompts` prompts, labels x
    templates, per request) and text embeddings at /v1/embed. At most `max_encodings` text
    encodings (or, for other models, pooled embeddings) run or wait at once; beyond, 503.
    """
    _check_limits(max_batch, max_wait_ms, max_upload_bytes, max_pixels, max_explanations)
    if not read_timeout_s > 0:
        raise ValueError(f"read_timeout_s must be positive, got {read_timeout_s}")
    if max_prompts < 2 or max_encodings < 1:
        raise ValueError(
            f"max_prompts must be at least 2 and max_encodings at least 1, got {max_prompts} "
            f"and {max_encodings}"
        )
    check_access(api_key, cors_origins)  # before the model is loaded: a bad key fails fast
    directory, clip, tokenizer = None, None, None
    if isinstance(model_dir_or_model, ViT):
        model, name = model_dir_or_model, name or "model"
    else:
        directory = resolve_model_dir(model_dir_or_model)
        name = name or directory.name
        if is_clip(directory):  # both towers; the image tower serves as any model does
            clip, tokenizer_file = load_clip(directory)
            tokenizer = load_tokenizer(clip, tokenizer_file)
            model = clip.visual
        else:
            model = load_model(directory)
    if model.config.num_classes == 0:
        raise ValueError(
            f"{name}: the model has no classification head (num_classes=0), so it has no "
            "labels to serve; serve a classifier"
        )
    if max_pixels is None:  # a 32-pixel model has no use for a 50-megapixel upload
        max_pixels = default_max_pixels(model.config.image_size)
    if clip is not None:
        clip.to(device).eval()
    model = model.to(device).eval()
    engine = Engine(
        model,
        precision,
        max_batch,
        compile=compile,
        compiled_dir=Path(compiled_dir) if compiled_dir is not None else None,
        source_dir=directory,
    )
    batcher = MicroBatcher(engine, max_batch, max_wait_ms, max_queue)
    encodings = Slots(max_encodings, "text encodings or embeddings")
    text = None
    if clip is not None and tokenizer is not None:
        text = TextSide(clip, tokenizer, batcher.call, encodings, max_prompts)
    limits = {
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "max_queue": batcher.max_queue,
        "max_explanations": max_explanations,
        "max_upload_bytes": max_upload_bytes,
        "max_pixels": max_pixels,
        "read_timeout_s": read_timeout_s,
        "max_encodings": max_encodings,
    }
    if text is not None:
        limits |= {
            "max_prompts": max_prompts,
            "max_texts": MAX_TEXTS,
            "max_text_chars": MAX_TEXT_CHARS,
            "label_sets_cached": CACHE_ENTRIES,
        }
    text_info = text.info() if text is not None else None
    info = model_info(name, model, engine.eager.precision, limits, text_info)
    info["auth"] = "bearer" if api_key is not None else None
    app = FastAPI(
        title="vitkit",
        summary=f"Classify images with the Vision Transformer {name!r}.",
        version=__version__,
        lifespan=_lifespan,
    )
    app.state.service = Service(
        name,
        model,
        batcher,
        max_upload_bytes,
        max_pixels,
        info,
        max_explanations,
        read_timeout_s,
        text,
        encodings,
    )
    add_access_control(app, api_key, cors_origins)  # added first: inside the Host check
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.add_exception_handler(ApiError, _refused)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _failed)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _check_limits(
    max_batch: int,
    max_wait_ms: float,
    max_upload_bytes: int,
    max_pixels: int | None,
    max_explanations: int,
) -> None:
    """Raises ValueError for a limit out of range (max_queue is the batcher's to check)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if max_wait_ms < 0:
        raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
    if max_upload_bytes < 1 or (max_pixels is not None and max_pixels < 1):
        raise ValueError("max_upload_bytes and max_pixels must be positive")
    if max_explanations < 1:
        raise ValueError(f"max_explanations must be at least 1, got {max_explanations}")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The service's threads and batcher live as long as the server runs."""
    service: Service = app.state.service
    service.start()
    try:
        yield
    finally:
        await service.stop()


# -- every error as {"error": "..."} ---------------------------------------------------------
async def _refused(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, e.status, headers=e.headers)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(e.detail)}, e.status_code, headers=e.headers)


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = [f"{err['loc'][-1]}: {err['msg']}" for err in e.errors()]
    return JSONResponse({"error": "; ".join(problems)}, 422)


async def _failed(request: Request, e: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error ({type(e).__name__}); see the log"}, 500)
