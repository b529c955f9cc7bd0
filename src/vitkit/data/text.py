"""Text to token ids for CLIP-style text towers, through Hugging Face `tokenizers`.

    tok = Tokenizer.from_file("tokenizer.json")   # CLIP's, or any other with start/end tokens
    ids = tok(["a photo of a cat", "a dog"])      # (2, 77) int64: sot, tokens, eot, zeros
    tok = train_tokenizer(captions, 4096)         # a new byte-level BPE for a small text tower

The layout is OpenCLIP's whatever the file: its own special tokens, padding and truncation
settings are not used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from vitkit.data.folder import printable
from vitkit.data.preprocess import open_regular
from vitkit.files import atomic_write

__all__ = ["Tokenizer", "TokenizerError", "train_tokenizer"]

# CLIP's tokenizer.json is 3.6 MB and the largest common ones (256k-token vocabularies) under
# 35 MB; the bound keeps a hostile file from filling memory before it is parsed.
MAX_TOKENIZER_BYTES = 64 << 20
# The text tower's embedding table has a row per id: an id of 2**31 in a hostile vocabulary
# must not become a model of billions of parameters. The largest real vocabularies are ~262k.
MAX_VOCAB_SIZE = 1 << 20
CONTEXT_LENGTH = 77  # CLIP's
# Each text becomes a row this long: a typo of 10**9 must not allocate gigabytes per caption.
MAX_CONTEXT_LENGTH = 1 << 16
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# Start/end pairs of added tokens tried when a tokenizer has no CLIP tokens and its
# post-processor names none (BERT's, RoBERTa's and Llama 3's conventions).
_BOS_EOS = (("[CLS]", "[SEP]"), ("<s>", "</s>"), ("<bos>", "<eos>"))
_BOS_EOS += (("<|begin_of_text|>", "<|end_of_text|>"),)


class TokenizerError(ValueError):
    """A tokenizer file that is missing, malformed, too large, or unusable for CLIP."""


class Tokenizer:
    """A CLIP-style tokenizer: text -> (N, context_length) int64 ids: start-of-text, the
    tokens, end-of-text, zero padding."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        context_length: int = CONTEXT_LENGTH,
        *,
        source: str = "tokenizer",
    ) -> None:
        """`backend` is used as it is, its padding and truncation settings turned off; `source`
        names it in errors (the file it came from)."""
        _check_context_length(context_length)
        self.backend = backend
        self.context_length = context_length
        # The layout is ours whatever the file says: a Fixed padding of 2**40 in a hostile file
        # must not allocate, and HF's truncation would cut before our end token is placed.
        backend.no_padding()
        backend.no_truncation()
        # A caption is text: "<|endoftext|>" typed into it is spelled out in ordinary tokens
        # (as OpenCLIP does), never read as the control token that ends the sequence.
        backend.encode_special_tokens = True
        self.sot_id, self.eot_id = _find_start_end(backend, source)
        # OpenCLIP's padding, though 0 is also a real token in CLIP's vocabulary: a text's end is
        # found by its eot, never by the padding.
        self.pad_id = 0
        ids = backend.get_vocab(with_added_tokens=True).values()
        # The largest id + 1, not the number of tokens: ids may have gaps.
        self.vocab_size = max(ids, default=-1) + 1
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise TokenizerError(
                f"{source}: token id {self.vocab_size - 1:,} in the vocabulary, over the limit "
                f"of {MAX_VOCAB_SIZE - 1:,}"
            )
        for what, i in (("start", self.sot_id), ("end", self.eot_id)):
            if backend.id_to_token(i) is None:  # a post-processor may name any id
                raise TokenizerError(f"{source}: {what} token id {i} is not in the vocabulary")
        if self.sot_id == self.eot_id:
            raise TokenizerError(
                f"{source}: the start and end tokens are the same (id {self.sot_id}), so the end "
                f"of a text could not be told from its start"
            )

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
        """A tokenizer.json (Hugging Face `tokenizers` format), bounded in size and checked."""
        _check_context_length(context_length)  # before reading a file in vain
        path = Path(path)
        name = printable(str(path))
        try:
            with open_regular(path) as f:
                data = f.read(MAX_TOKENIZER_BYTES + 1)
        except FileNotFoundError:
            raise TokenizerError(f"{name}: no such file") from None
        except OSError as e:
            raise TokenizerError(f"{name}: {_one_line(e.strerror or str(e))}") from None
        if len(data) > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{name}: larger than the limit of {MAX_TOKENIZER_BYTES:,} bytes")
        try:
            text = data.decode("utf-8")
            doc = json.loads(text)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
            raise TokenizerError(f"{name}: not valid JSON: {_one_line(str(e))}") from None
        if not isinstance(doc, dict) or "model" not in doc:
            raise TokenizerError(f"{name}: not a tokenizer.json (no 'model' object)")
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for every malformed field
            raise TokenizerError(f"{name}: not a valid tokenizer: {_one_line(str(e))}") from None
        return cls(backend, context_length, source=name)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """`texts` (one or several) as a (N, context_length) int64 tensor of ids."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a sequence of str, not {type(texts).__name__}")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str")
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.int64)
        # Without the file's special tokens: sot and eot are placed here, the same for any file.
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        # OpenCLIP's rule, tokens = [sot, *ids, eot], cut to tokens[:ctx] with the last one
        # replaced by eot when too long, is the same as keeping the first ctx - 2 ids.
        keep, rows = self.context_length - 2, []
        for enc in encodings:
            ids = enc.ids[:keep]
            rows.append([self.sot_id, *ids, self.eot_id] + [self.pad_id] * (keep - len(ids)))
        return torch.tensor(rows, dtype=torch.int64)

    def to_json(self) -> str:
        """The tokenizer.json text (padding and truncation off: the layout is this class's)."""
        return self.backend.to_str()

    def save(self, path: str | Path) -> None:
        """Write the tokenizer.json to `path` atomically."""
        atomic_write(path, self.to_json())

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"sot_id={self.sot_id}, eot_id={self.eot_id})"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """A new byte-level BPE over words and punctuation, trained on `texts` (lower-cased, NFC,
    whitespace collapsed), with
    `vocab_size` ids at most, of which the last two are "<|startoftext|>" and "<|endoftext|>".
    The same texts give the same tokenizer."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, not {type(vocab_size).__name__}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if not len(alphabet) + 2 <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size}: must be between {len(alphabet) + 2} (the 256 bytes and "
            f"the two special tokens) and {MAX_VOCAB_SIZE:,}"
        )
    if isinstance(texts, str):  # one string would be trained on as characters
        raise TypeError("texts must be an iterable of str, not a str")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    # Words and punctuation split apart, then bytes (every byte is in the vocabulary, so no
    # text is ever unknown). No space marker is kept (unlike GPT-2's): "shirt" is one token
    # whether it follows a space, a hyphen or a slash, so a name never captioned can still be
    # read through the parts it shares with those that were ("shirt" in "T-shirt/top"). The
    # ids feed a text tower; decoding them loses the spaces between words.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Whitespace(),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        min_frequency=2,  # a pair seen once is a caption memorised, not a word
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(_strings(texts), trainer)
    # Added after training, so they get the two largest ids as in CLIP, whose text towers pool
    # the features at the argmax of the ids, the eot.
    backend.add_special_tokens([SOT, EOT])
    sot, eot = backend.token_to_id(SOT), backend.token_to_id(EOT)
    # Hugging Face's own encode() then gives the same layout (less the padding).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, eot)]
    )
    return Tokenizer(backend, source="trained tokenizer")


def _check_context_length(context_length: int) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, not {type(context_length).__name__}")
    if not 2 <= context_length <= MAX_CONTEXT_LENGTH:
        raise ValueError(
            f"context_length {context_length}: must be between 2 (start and end tokens) and "
            f"{MAX_CONTEXT_LENGTH:,}"
        )


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str")
        yield text


def _find_start_end(backend: tokenizers.Tokenizer, source: str) -> tuple[int, int]:
    """The ids of the start and end tokens: CLIP's if the vocabulary has them, else those the
    post-processor puts around a single text, else a conventional pair of special tokens."""
    sot, eot = backend.token_to_id(SOT), backend.token_to_id(EOT)
    if sot is not None and eot is not None:
        return sot, eot
    try:
        post = json.loads(backend.to_str()).get("post_processor")
    except ValueError:
        post = None
    found = _post_processor_start_end(post)
    if found is not None:
        return found
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    for bos, eos in _BOS_EOS:
        if bos in special and eos in special:
            return backend.token_to_id(bos), backend.token_to_id(eos)
    raise TokenizerError(
        f"{source}: no start and end tokens: neither {SOT} and {EOT}, nor a post-processor "
        f"that puts one token before and one after the text, nor a special pair such as <s> </s>"
    )


def _post_processor_start_end(post: Any) -> tuple[int, int] | None:
    """(start id, end id) from a tokenizer.json post-processor, if it puts a single token
    on each side of a lone text (BERT, RoBERTa, template), else None."""
    if not isinstance(post, dict):
        return None
    kind = post.get("type")
    if kind == "Sequence":
        for p in post.get("processors") or ():
            found = _post_processor_start_end(p)
            if found is not None:
                return found
        return None
    if kind in ("BertProcessing", "RobertaProcessing"):
        cls, sep = post.get("cls"), post.get("sep")
        if _is_token_pair(cls) and _is_token_pair(sep):
            return cls[1], sep[1]
        return None
    if kind != "TemplateProcessing":
        return None
    single, specials = post.get("single"), post.get("special_tokens")
    if not isinstance(single, list) or not isinstance(specials, dict):
        return None
    names = [_template_item(item) for item in single]
    if names.count(None) != 1 or len(names) != 3 or names[1] is not None:
        return None  # not exactly: special, text, special
    sot, eot = (_template_special_id(specials.get(name)) for name in (names[0], names[2]))
    return (sot, eot) if sot is not None and eot is not None else None


def _is_token_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and _token_id(value[1]) is not None


def _template_item(item: Any) -> str | None:
    """The name of a template's special token, or None for the text ($A) or anything else."""
    if isinstance(item, dict) and isinstance(item.get("SpecialToken"), dict):
        name = item["SpecialToken"].get("id")
        return name if isinstance(name, str) else None
    return None


def _template_special_id(spec: Any) -> int | None:
    ids = spec.get("ids") if isinstance(spec, dict) else None
    # Several ids for one "token" are not a single start or end token.
    return _token_id(ids[0]) if isinstance(ids, list) and len(ids) == 1 else None


def _token_id(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_VOCAB_SIZE
    return value if ok else None


def _one_line(text: str) -> str:
    return printable(" ".join(text.split()))
