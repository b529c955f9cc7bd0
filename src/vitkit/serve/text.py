"""A CLIP's text side in the service: labels and texts from a request, their embeddings, and a
small cache of label sets, for /v1/zero-shot and /v1/embed.

A label set's class embeddings (each label in the prompt templates, embedded by the text
tower, averaged: `vitkit.infer.zero_shot.class_embeddings`) are kept in a bounded LRU keyed by
(labels, templates), so a page that sends the same labels with every image pays for them
once; two requests for the same uncached set share one encoding. Encodings run on the
model's thread (`MicroBatcher.call`) a few dozen prompts per call, so predictions' batches
go on between them. At most `max_encodings` run or wait at once (beyond: 503), and a request
names at most `max_prompts` prompts (labels x templates) or `MAX_TEXTS` texts (beyond: 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from vitkit.data.text import Tokenizer
from vitkit.infer.zero_shot import (
    DEFAULT_TEMPLATES,
    MAX_LABELS,
    MAX_TEMPLATES,
    check_labels,
    check_templates,
    class_embeddings,
    split_labels,
)
from vitkit.model.clip import CLIP
from vitkit.model.vit import count_params
from vitkit.serve.decode import ApiError

T = TypeVar("T")
Run = Callable[..., Awaitable[Any]]  # `MicroBatcher.call`: fn(*args) on the model's thread
Key = tuple[tuple[str, ...], tuple[str, ...]]  # a label set: its labels and templates

# Prompts (labels x templates) a request may have the text tower embed: 1,000 labels with
# one template, or 12 with 80 (CLIP's ImageNet ensemble); ~10 s of a CPU for CLIP B/16's
# text tower, once per label set.
DEFAULT_MAX_PROMPTS = 1000
MAX_TEXTS = 256  # texts per /v1/embed request
MAX_TEXT_CHARS = 1000  # per text (the tokenizer keeps only the context's first tokens)
DEFAULT_MAX_ENCODINGS = 2  # text encodings (and pooled embeddings) running or waiting
# Prompts per call of the text tower on the model's thread: about as long as a batch of
# images, so predictions wait at most that long for one.
PROMPTS_PER_CALL = 32
# The label sets' cache: at most this many sets, and this many labels in all (768 floats
# each for the largest CLIPs: 50 MB).
CACHE_ENTRIES = 32
CACHE_LABELS = 16_384
_RETRY_AFTER = {"Retry-After": "1"}


class Slots:
    """A count of work running beside the batches, refused with 503 beyond `limit`."""

    def __init__(self, limit: int, what: str) -> None:
        if limit < 1:
            raise ValueError(f"max_encodings must be at least 1, got {limit}")
        self.limit, self.what, self.taken = limit, what, 0

    def take(self) -> None:
        if self.taken >= self.limit:
            raise ApiError(
                503, f"{self.limit} {self.what} are running already; retry shortly", _RETRY_AFTER
            )
        self.taken += 1

    def give(self) -> None:
        self.taken -= 1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.take()
        try:
            yield
        finally:
            self.give()


class TextSide:
    """A CLIP's text tower and tokenizer, for the requests that name labels or texts."""

    def __init__(
        self,
        clip: CLIP,
        tokenizer: Tokenizer,
        run: Run,
        slots: Slots,
        max_prompts: int = DEFAULT_MAX_PROMPTS,
    ) -> None:
        """`run(fn, *args)` runs `fn` on the model's thread; `slots` bound the encodings."""
        if max_prompts < 2:
            raise ValueError(f"max_prompts must be at least 2, got {max_prompts}")
        self.clip, self.tokenizer, self.run, self.slots = clip, tokenizer, run, slots
        self.max_prompts = max_prompts
        with torch.no_grad():
            self.scale = float(clip.scale)
        self._cache: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self._pending: dict[Key, asyncio.Task[torch.Tensor]] = {}

    @property
    def dim(self) -> int:
        return self.clip.text.config.embed_dim

    def info(self) -> dict[str, Any]:
        """The text tower's sizes, for /v1/model."""
        c = self.clip.text.config
        return {
            "width": c.width,
            "depth": c.depth,
            "heads": c.heads,
            "context_length": c.context_length,
            "vocab_size": c.vocab_size,
            "embed_dim": c.embed_dim,
            "parameters": count_params(self.clip.text),
            "logit_scale": round(self.scale, 4),
            "default_templates": list(DEFAULT_TEMPLATES),
        }

    # -- what a request asks for ----------------------------------------------------------
    def labels(self, value: object) -> list[str]:
        """The labels of a request: a list of strings, or one string, comma-separated (or a
        JSON list); refused (400) beyond the prompt bound or by `check_labels`."""
        if value is None:
            raise ApiError(
                400,
                'zero-shot needs labels: "labels": ["a cat", "a dog"] in JSON, or a form or '
                'query field "labels" of comma-separated labels',
            )
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = _json_list(value, "labels")
        elif isinstance(value, str):
            value = split_labels(value)
        if not isinstance(value, list):
            raise ApiError(400, "labels must be a list of strings, or comma-separated text")
        limit = min(self.max_prompts, MAX_LABELS)
        if len(value) > limit:  # before check_labels, whose work grows with the count
            raise ApiError(400, f"at most {limit:,} labels per request, got {len(value):,}")
        try:
            return check_labels(value)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def templates(self, value: object, labels: int) -> list[str]:
        """The prompt templates of a request (default: `DEFAULT_TEMPLATES`): a list of strings
        or, in a form or query field, one template or a JSON list; `labels` x templates at
        most `max_prompts`."""
        if value is None:
            value = list(DEFAULT_TEMPLATES)
        elif isinstance(value, str):
            value = _json_list(value, "templates") if value.lstrip().startswith("[") else [value]
        if not isinstance(value, list):
            raise ApiError(400, "templates must be a list of strings with one {} each")
        if len(value) > MAX_TEMPLATES:
            raise ApiError(400, f"give 1 to {MAX_TEMPLATES} templates, got {len(value):,}")
        try:
            templates = check_templates(value)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        prompts = labels * len(templates)
        if prompts > self.max_prompts:
            raise ApiError(
                400,
                f"{labels:,} labels x {len(templates)} templates make {prompts:,} prompts; this "
                f"service embeds at most {self.max_prompts:,} per request",
            )
        return templates

    def texts(self, value: object) -> list[str]:
        """Texts to embed: one string or a list of 1 to `MAX_TEXTS`, each 1 to
        `MAX_TEXT_CHARS` characters."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ApiError(400, '"text" must be a string or a list of strings')
        if not 0 < len(value) <= MAX_TEXTS:
            raise ApiError(400, f"give 1 to {MAX_TEXTS} texts per request, got {len(value):,}")
        for text in value:
            if not text.strip() or len(text) > MAX_TEXT_CHARS:
                raise ApiError(
                    400,
                    f"each text must have 1 to {MAX_TEXT_CHARS:,} characters, got {text[:40]!r}",
                )
        return value

    # -- the work -----------------------------------------------------------------------------
    async def class_embeddings(
        self, labels: list[str], templates: list[str]
    ) -> tuple[torch.Tensor, bool]:
        """(labels, E) normalised class embeddings, and whether they came from the cache."""
        key = (tuple(labels), tuple(templates))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit, True
        task = self._pending.get(key)
        if task is None:
            self.slots.take()
            task = asyncio.get_running_loop().create_task(self._encode_labels(key))
            self._pending[key] = task
            task.add_done_callback(functools.partial(self._settled, key))
        # Shielded: a client that goes away does not cancel what another may be waiting for.
        return await asyncio.shield(task), False

    async def _encode_labels(self, key: Key) -> torch.Tensor:
        labels, templates = list(key[0]), list(key[1])
        per_call = max(2, PROMPTS_PER_CALL // len(templates))
        parts = [
            await self.run(class_embeddings, self.clip, self.tokenizer, group, templates)
            for group in _groups(labels, per_call)
        ]
        classes = torch.cat(parts)
        self._remember(key, classes)
        return classes

    def _settled(self, key: Key, task: asyncio.Task[torch.Tensor]) -> None:
        """An encoding has ended (or was cancelled before it began): its slot is free."""
        self.slots.give()
        del self._pending[key]
        if not task.cancelled():
            task.exception()  # retrieved: an encoding no one waits for any more is not logged

    def _remember(self, key: Key, rows: torch.Tensor) -> None:
        """Keeps a label set's embeddings, dropping the least recently used beyond the bounds."""
        if len(rows) > CACHE_LABELS:
            return
        self._cache[key] = rows
        while len(self._cache) > CACHE_ENTRIES or self._cached_labels() > CACHE_LABELS:
            self._cache.popitem(last=False)

    def _cached_labels(self) -> int:
        return sum(len(rows) for rows in self._cache.values())

    @property
    def cached(self) -> int:
        """Label sets in the cache."""
        return len(self._cache)

    def rank(
        self, image: torch.Tensor, classes: torch.Tensor, labels: list[str], k: int
    ) -> list[tuple[str, float]]:
        """The `k` most probable labels for an image embedding (E,): softmax over the scaled
        cosine similarities with the class embeddings, as `ZeroShotHead`."""
        with torch.no_grad():
            image = F.normalize(image.float().to(classes.device), dim=-1)
            probs = (self.scale * (classes.float() @ image)).softmax(dim=-1)
            top, index = probs.topk(min(k, len(labels)))
        return [(labels[i], p) for i, p in zip(index.tolist(), top.tolist(), strict=True)]

    async def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, E) L2-normalised text embeddings, on the model's thread, a few per call."""
        with self.slots.held():
            parts = [
                await self.run(self._encode_texts, texts[i : i + PROMPTS_PER_CALL])
                for i in range(0, len(texts), PROMPTS_PER_CALL)
            ]
        return torch.cat(parts)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.clip.text.parameters()).device
        with torch.inference_mode():
            ids = self.tokenizer(texts).to(device)
            return self.clip.encode_text(ids).float().cpu()


def _groups(labels: Sequence[str], size: int) -> list[list[str]]:
    """`labels` in groups of `size`, none of a single label (`class_embeddings` needs two)."""
    groups = [list(labels[i : i + size]) for i in range(0, len(labels), size)]
    if len(groups) > 1 and len(groups[-1]) < 2:
        last = groups.pop()
        groups[-1] += last
    return groups


def _json_list(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, f"{name}: not a valid JSON list") from None
