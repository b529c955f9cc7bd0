"""An upload, from request body to model pixels, within the service's limits.

Every refusal is an `ApiError` whose status and message go back to the client as
`{"error": "..."}`: a body over the size limit (413), a content type other than multipart,
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
from collections.abc import AsyncIterator
from typing import Any

import torch
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from vitkit.config import ViTConfig
from vitkit.data.preprocess import IMAGE_FORMATS, load_image

DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo still fits


class ApiError(Exception):
    """A request the service refuses: the HTTP status, a message for the client, and any
    headers for the response (e.g. Retry-After with a 503)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# -- the body -------------------------------------------------------------------------------
async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """The image bytes of a multipart, JSON or raw-image request, and its other fields."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ApiError(
            413, f"the body is {int(length):,} bytes, over the limit of {max_bytes:,} bytes"
        )
    body = _limited_body(request, max_bytes)
    if media == "multipart/form-data":
        return await _read_multipart(request, body)
    if media == "application/json" or media.endswith("+json"):
        return await asyncio.to_thread(_read_json, b"".join([chunk async for chunk in body]))
    if media.startswith("image/") or media == "application/octet-stream":
        return b"".join([chunk async for chunk in body]), {}
    raise ApiError(
        415,
        f"unsupported content type {media or '(none)'!r}: send multipart/form-data with a "
        'file field "file", application/json {"image": "<base64>"}, or the image bytes '
        "with an image/* type",
    )


async def _limited_body(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body, chunk by chunk, stopped with a 413 as soon as it passes the limit (a chunked
    body has no Content-Length to check first)."""
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"the body is over the limit of {max_bytes:,} bytes")
            yield chunk
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None


async def _read_multipart(
    request: Request, body: AsyncIterator[bytes]
) -> tuple[bytes, dict[str, Any]]:
    """The file part "file" and the text fields of a multipart/form-data body."""
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


def _read_json(raw: bytes) -> tuple[bytes, dict[str, Any]]:
    """The base64 "image" of a JSON object, and the object."""
    try:
        doc = json.loads(raw)
    # RecursionError: JSON nested too deep to parse.
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
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
