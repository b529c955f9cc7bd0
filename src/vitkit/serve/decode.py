"""An upload, from request body to model pixels, within the service's limits.

Every refusal is an `ApiError` whose status and message go back to the client as
`{"error": "..."}`: a body over the size limit (413) or not all sent within the read
timeout (408), a content type other than multipart,
JSON or an image (415), malformed multipart, JSON or base64 (400), bytes that are not an
image, an image cut short, a bad `top_k` (422), an image that declares more pixels than the
limit (413; checked from its header, before anything is decoded). A JSON body is parsed and
its base64 decoded off the event loop, so a large one does not hold up other requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import torch
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from vitkit.config import ViTConfig
from vitkit.data.preprocess import (
    IMAGE_FORMATS,
    ImageTooLarge,
    centre_crop,
    check_pixels,
    load_image,
)

DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000  # the most the default allows: a 48-megapixel photo fits
MIN_DEFAULT_MAX_PIXELS = 4096 * 4096  # the least: a 12-megapixel photo fits any model
DEFAULT_READ_TIMEOUT_S = 10.0  # a full 16 MiB upload in time needs about 13 Mbit/s


class ApiError(Exception):
    """A request the service refuses: the HTTP status, a message for the client, and any
    headers for the response (e.g. Retry-After with a 503)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# -- the body -------------------------------------------------------------------------------
async def read_upload(
    request: Request,
    max_bytes: int,
    timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    *,
    image_required: bool = True,
) -> tuple[bytes, dict[str, Any]]:
    """The image bytes of a multipart, JSON or raw-image request, and its other fields; a 408
    when the body has not all arrived `timeout_s` after reading it began. Without
    `image_required`, a multipart body without a file part or a JSON object without "image"
    gives empty bytes and its fields (texts to embed)."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ApiError(
            413, f"the body is {int(length):,} bytes, over the limit of {max_bytes:,} bytes"
        )
    body = _limited_body(request, max_bytes, timeout_s)
    if media == "multipart/form-data":
        return await _read_multipart(request, body, image_required)
    if media == "application/json" or media.endswith("+json"):
        raw = b"".join([chunk async for chunk in body])
        return await asyncio.to_thread(_read_json, raw, image_required)
    if media.startswith("image/") or media == "application/octet-stream":
        return b"".join([chunk async for chunk in body]), {}
    raise ApiError(
        415,
        f"unsupported content type {media or '(none)'!r}: send multipart/form-data with a "
        'file field "file", application/json {"image": "<base64>"}, or the image bytes '
        "with an image/* type",
    )


async def _limited_body(request: Request, max_bytes: int, timeout_s: float) -> AsyncIterator[bytes]:
    """The body, chunk by chunk, stopped with a 413 as soon as it passes the limit (a chunked
    body has no Content-Length to check first) or with a 408 at the deadline, `timeout_s`
    after the first chunk is asked for."""
    # One deadline for the whole body, not a timeout per chunk: a client that trickles a byte
    # every few seconds passes any per-chunk timeout and holds its connection for as long as
    # it likes (slowloris). The deadline covers only the waits for the next chunk, never a
    # `yield`, so it cannot fire inside the consumer (the multipart parser) instead.
    deadline = asyncio.get_running_loop().time() + timeout_s
    chunks = request.stream()
    size = 0
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise ApiError(
                    408,
                    f"the body did not all arrive within {timeout_s:g} s",
                    {"Connection": "close"},  # the rest of the body is never read
                ) from None
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"the body is over the limit of {max_bytes:,} bytes")
            yield chunk
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None


async def _read_multipart(
    request: Request, body: AsyncIterator[bytes], image_required: bool = True
) -> tuple[bytes, dict[str, Any]]:
    """The file part "file" and the text fields of a multipart/form-data body."""
    try:
        parser = MultiPartParser(request.headers, body, max_files=1, max_fields=8)
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart body: {e.message}") from None
    try:
        upload = form.get("file")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if upload is None and not image_required:
            return b"", fields
        if not isinstance(upload, UploadFile):
            # Also what a body cut short in its file part looks like.
            raise ApiError(422, 'the multipart body has no complete file part "file"')
        return await upload.read(), fields
    finally:
        await form.close()


def _read_json(raw: bytes, image_required: bool = True) -> tuple[bytes, dict[str, Any]]:
    """The base64 "image" of a JSON object, and the object."""
    try:
        doc = json.loads(raw)
    # RecursionError: JSON nested too deep to parse.
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if isinstance(doc, dict) and "image" not in doc and not image_required:
        return b"", doc
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
        raise ApiError(422, 'expected a JSON object {"image": "<the image file in base64>", ...}')
    return decode_base64(doc["image"]), doc


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
    # isdecimal, not isdigit: "²" is a digit that int() refuses.
    if isinstance(value, str) and value.strip().isdecimal():
        with contextlib.suppress(ValueError):  # more digits than int() reads from a string
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(422, f"top_k must be a positive integer, got {value!r}")
    return value


# -- the image ------------------------------------------------------------------------------
def decode_image(data: bytes, config: ViTConfig, max_pixels: int) -> torch.Tensor:
    """Uploaded bytes as the model's uint8 (C, S, S) pixels, by `load_image`'s rules, cropped
    as the model was evaluated (`config.crop_pct`).

    Raises `ApiError` for bytes that are not an image of `IMAGE_FORMATS`, an image that
    cannot be decoded (truncated, corrupt), or one that declares more than `max_pixels` (413;
    see `check_pixels`). Only the first frame of a multi-frame image is decoded.
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
        s = config.image_size
        # The shorter side that still covers the crop at s x s.
        need = math.ceil(s / config.crop_pct)
        try:
            # By the size declared (a GIF's grown to its first frame) and TIFF tiles.
            check_pixels(img, max_pixels)
            img.draft(None, (need, need))  # as load_image does for files: JPEGs at reduced scale
            crop = centre_crop(config.crop_pct)
            return load_image(img, config.in_channels, s, config.interpolation, crop=crop)
        except ImageTooLarge as e:
            raise ApiError(413, str(e)) from None
        except Image.DecompressionBombError as e:  # e.g. a frame larger than the image
            raise ApiError(413, f"the image is over the pixel limit: {e}") from None
        except Exception as e:
            raise ApiError(422, f"cannot decode the image: {str(e) or type(e).__name__}") from None


def default_max_pixels(image_size: int) -> int:
    """The pixel limit for a model taking `image_size` x `image_size` inputs, when none is set:
    (64 x the input's side) squared, within [`MIN_DEFAULT_MAX_PIXELS`, `DEFAULT_MAX_PIXELS`].

    Decoding holds the decoded frame (at most 4 bytes a pixel) and small strips of it, so the
    limit bounds the memory of each decode: about 67 MB at the floor, 200 MB at the cap. A
    32-pixel model gets the floor; a 224-pixel one the cap.
    """
    return min(DEFAULT_MAX_PIXELS, max(MIN_DEFAULT_MAX_PIXELS, (64 * image_size) ** 2))
