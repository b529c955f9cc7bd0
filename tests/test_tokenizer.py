"""vitkit.data.text: CLIP's tokenizer.json against OpenCLIP's own tokenizer, trained
tokenizers, and hostile tokenizer files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, processors

from vitkit.benchmark import declare_torchvision_ops
from vitkit.data import text
from vitkit.data.text import Tokenizer, TokenizerError, train_tokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
LONG = " ".join(f"word{i}, and" for i in range(60))  # far over 77 tokens

# Every case must give OpenCLIP's ids exactly.
PARITY = {
    "plain": "a photo of a cat",
    "caption": "A close-up photo of a red sneaker on a wooden floor.",
    "punctuation": "Hello, world! (really?) -- yes; \"quoted\" it's, don't, we'll... #1 @me",
    "numbers": "3.14159 and 2024-01-01, 1,000,000 items at 42% for $9.99",
    "accents": "café naïve Ångström résumé",
    "decomposed": "cafe\u0301 \u212bngstr\u00f6m",  # NFC: e + combining acute, the Angstrom sign
    "german": "Die Straße, Grüße aus Köln",
    "cjk": "日本語のテキスト",
    "scripts": "안녕하세요 مرحبا नमस्ते İstanbul",
    "emoji": "a dog 🐶 and a cat 🐱 👍🏽 🇫🇷",
    "mixed case": "A PhOtO oF a CAT, NASA's iPhone",
    "whitespace": "  a   photo \n\n of\ta \r\n cat\u00a0in\u2003snow  ",
    "empty": "",
    "only spaces": "     ",
    "only whitespace": "\t\n \r\n",
    "long": LONG,
    "special-token text": "x <|endoftext|> y <|startoftext|>",  # plain text, not control tokens
    "markup": "<b>bold</b> a<br>b",
}
# Not in the corpus, because Hugging Face's CLIP normaliser (NFC, whitespace, per-character
# lower case) is not OpenCLIP's cleaning (ftfy.fix_text, html.unescape twice, Python's
# str.split and str.lower), and each of these gives other ids:
#   HTML entities "fish &amp; chips" (unescaped by OpenCLIP only); curly quotes "‘a’ “b”"
#   (straightened by ftfy); ligatures "ﬁne"; full-width "ＡＢＣ１２３"; mojibake "cafÃ©";
#   control characters "a\x00b" (dropped by ftfy); "\x1c".."\x1f" (whitespace to Python, not
#   to Rust's \s); "\u2028", "\x85" (line breaks to ftfy); a final capital sigma "ΟΔΟΣ"
#   (Python lower-cases it to "ς", tokenizers to "σ").


@pytest.fixture(scope="module")
def open_clip():
    declare_torchvision_ops()  # open_clip imports timm and torchvision
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def clip_json(open_clip, tmp_path_factory) -> Path:
    """CLIP's tokenizer.json made by Hugging Face transformers from the BPE file OpenCLIP
    ships, its vocabulary built the way OpenAI's SimpleTokenizer builds its encoder."""
    declare_torchvision_ops()
    transformers = pytest.importorskip("transformers")
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += [SOT, EOT]
    src = tmp_path_factory.mktemp("clip-vocab")
    (src / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # from_pretrained on the folder: in transformers 5, CLIPTokenizerFast(vocab_file=...,
    # merges_file=...) ignores both files and builds a vocabulary of 2 tokens.
    hf = transformers.CLIPTokenizerFast.from_pretrained(src)
    assert len(hf) == 49408 and hf.convert_tokens_to_ids(EOT) == 49407
    out = tmp_path_factory.mktemp("clip-tokenizer")
    hf.save_pretrained(out)
    return out / "tokenizer.json"


@pytest.fixture(scope="module")
def clip(clip_json) -> Tokenizer:
    return Tokenizer.from_file(clip_json)


def test_clip_parity_with_open_clip(clip, open_clip):
    texts = list(PARITY.values())
    ours, theirs = clip(texts), open_clip.tokenize(texts, context_length=77)
    assert ours.dtype == torch.int64 and ours.shape == (len(texts), 77)
    for name, a, b in zip(PARITY, ours, theirs, strict=True):
        assert a.tolist() == b.tolist(), name
    assert (clip.sot_id, clip.eot_id, clip.pad_id, clip.vocab_size) == (49406, 49407, 0, 49408)
    # One string is a batch of one, the same row.
    assert torch.equal(clip(PARITY["emoji"]), ours[[list(PARITY).index("emoji")]])


def test_clip_truncation_is_open_clips(clip, clip_json, open_clip):
    long = clip(LONG)[0]
    assert long[-1] == clip.eot_id and (long != 0).all()  # cut, its last token made eot
    assert clip(LONG + " more words")[0].tolist() == long.tolist()
    assert clip("")[0, :3].tolist() == [clip.sot_id, clip.eot_id, 0]
    # Short contexts cut nearly every text: the rule, not only the padding, is OpenCLIP's.
    texts = list(PARITY.values())
    short = {8: Tokenizer.from_file(clip_json, context_length=8)}
    short |= {n: Tokenizer(clip.backend, context_length=n) for n in (2, 3)}  # parsed once
    for n, tok in short.items():
        assert torch.equal(tok(texts), open_clip.tokenize(texts, context_length=n)), n


CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
CLASSES += ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of the {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a pixelated photo of the {}.",
    "a grayscale image of a {}.",
    "an item of clothing: {}",
    "this is a {}",
    "a product picture of a {}",
    "a {} on a white background",
    "a 28x28 picture of the {}",
    "my favourite {}!",
    "a  {} ,  seen   from above",
    "A PHOTO OF A {}",
    "a folded {}",
    "a worn {}",
    "a new {}",
    "the {} in a shop window",
    "a drawing of a {}",
    "an old {}",
    "a clean {}",
    "a dirty {}",
    "a {} for sale",
    "a {} in the wardrobe",
    "a {} (fashion-mnist)",
]
CAPTIONS = [t.format(c) for t in TEMPLATES for c in CLASSES]  # 300 captions


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_tokenizer(CAPTIONS, vocab_size=512)


def test_trained_tokenizer_layout(trained):
    assert trained.vocab_size <= 512
    # The special tokens take the two largest ids: CLIP's towers pool at argmax(ids) = eot.
    assert (trained.sot_id, trained.eot_id) == (trained.vocab_size - 2, trained.vocab_size - 1)
    texts = [*CAPTIONS[:20], "", "   ", "unseen words: café 日本語 🐶", LONG]
    ids = trained(texts)
    assert ids.shape == (len(texts), 77) and ids.dtype == torch.int64
    for caption, row in zip(texts, ids.tolist(), strict=True):
        n = row.index(trained.eot_id) + 1
        assert row[0] == trained.sot_id and set(row[n:]) <= {0}, caption
        assert trained.sot_id not in row[1:n] and trained.eot_id not in row[1 : n - 1], caption
        body = row[1 : n - 1]
        if caption is not LONG:  # byte-level: every text comes back, normalised, none unknown
            # Spaces between words are not kept (see train_tokenizer).
            assert trained.backend.decode(body) == "".join(caption.lower().split())
            # The file's post-processor gives Hugging Face users the same layout.
            assert trained.backend.encode(caption).ids == row[:n]
    assert ids[-1, -1] == trained.eot_id  # LONG, cut
    # Common words of the captions became single tokens.
    assert len(trained(["photo"])[0].nonzero()) == 3
    assert trained("A  PHOTO\tof").tolist() == trained("a photo of").tolist()


def test_trained_tokenizer_round_trip_and_determinism(trained, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    trained.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left
    loaded = Tokenizer.from_file(path)
    assert (loaded.sot_id, loaded.eot_id, loaded.vocab_size) == (
        trained.sot_id,
        trained.eot_id,
        trained.vocab_size,
    )
    texts = [*CAPTIONS, "unseen: ÅNGSTRÖM 🐱", LONG]
    assert torch.equal(loaded(texts), trained(texts))
    again = train_tokenizer(iter(CAPTIONS), vocab_size=512)  # any iterable
    assert again.to_json() == trained.to_json()
    assert torch.equal(again(texts), trained(texts))
    # And the tokenizer learns from its texts: other captions, another vocabulary.
    assert train_tokenizer(CAPTIONS[::-1][:100], vocab_size=512).to_json() != trained.to_json()


def test_layout_ignores_the_files_own_settings(trained, tmp_path):
    """Padding, truncation and post-processor in the file change nothing (and a Fixed padding
    of 2**40 is never allocated). CLIP's own file, with its RoBERTa post-processor, is covered
    by the parity tests."""
    backend = tokenizers.Tokenizer.from_str(trained.to_json())
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=2**40, pad_id=5)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{EOT} {EOT} $A", special_tokens=[(EOT, trained.eot_id)]
    )
    path = tmp_path / "tokenizer.json"
    path.write_text(backend.to_str())
    texts = [CAPTIONS[0], LONG]
    assert torch.equal(Tokenizer.from_file(path)(texts), trained(texts))


def _write(path: Path, backend: tokenizers.Tokenizer) -> Path:
    path.write_text(backend.to_str())
    return path


def _word_level(tokens: list[str], special: list[str] = ()) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=tokens[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(special))
    return backend


def test_start_and_end_from_post_processor_or_added_tokens(tmp_path):
    words = ["[UNK]", "a", "cat", "<go>", "<stop>", "[CLS]", "[SEP]"]
    template = _word_level(words)
    template.post_processor = processors.TemplateProcessing(
        single="<go> $A <stop>", special_tokens=[("<go>", 3), ("<stop>", 4)]
    )
    tok = Tokenizer.from_file(_write(tmp_path / "template.json", template), context_length=6)
    assert (tok.sot_id, tok.eot_id) == (3, 4)
    assert tok("a cat").tolist() == [[3, 1, 2, 4, 0, 0]]
    bert = _word_level(words)
    bert.post_processor = processors.BertProcessing(("[SEP]", 6), ("[CLS]", 5))
    tok = Tokenizer.from_file(_write(tmp_path / "bert.json", bert), context_length=4)
    assert tok(["cat a cat", "a"]).tolist() == [[5, 2, 1, 6], [5, 1, 6, 0]]
    seq = _word_level(words)
    seq.post_processor = processors.Sequence(
        [processors.ByteLevel(), processors.RobertaProcessing(("<stop>", 4), ("<go>", 3))]
    )
    assert Tokenizer.from_file(_write(tmp_path / "seq.json", seq)).sot_id == 3
    added = _word_level(["<unk>", "a", "cat"], special=["<s>", "</s>"])
    tok = Tokenizer.from_file(_write(tmp_path / "added.json", added))
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (3, 4, 5)


@pytest.mark.parametrize(
    "case",
    ["none", "start only", "one-sided template", "same token", "id not in vocabulary"],
)
def test_tokenizer_without_start_and_end_refused(tmp_path, case):
    backend = _word_level(["<unk>", "a", "<s>", "</s>"])
    if case == "start only":
        backend = _word_level(["<unk>", "a"], special=["<s>"])
    elif case == "one-sided template":  # Llama's: a start token only
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 2)]
        )
    elif case == "same token":
        backend.post_processor = processors.BertProcessing(("</s>", 3), ("</s>", 3))
    elif case == "id not in vocabulary":
        backend.post_processor = processors.BertProcessing(("</s>", 3), ("<s>", 999))
    path = _write(tmp_path / "tokenizer.json", backend)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_file(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    expected = {"same token": "the same", "id not in vocabulary": "999 is not in the vocabulary"}
    assert expected.get(case, "no start and end tokens") in message


def _hostile(tmp_path: Path, case: str, trained: Tokenizer) -> Path:
    path = tmp_path / "tokenizer.json"
    good = json.loads(trained.to_json())
    if case == "missing":
        pass
    elif case == "directory":
        path.mkdir()
    elif case == "not JSON":
        path.write_text('{"model": {"type": "BPE", ')
    elif case == "not UTF-8":
        path.write_bytes(b'{"model": "\xff\xfe"}')
    elif case == "deep JSON":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "a JSON list":
        path.write_text("[1, 2, 3]")
    elif case == "config.json":
        path.write_text('{"architectures": ["CLIPModel"], "projection_dim": 512}')
    elif case == "unknown model":
        path.write_text(json.dumps({**good, "model": {"type": "Nonsense", "vocab": 3}}))
    elif case == "vocab not a dict":
        path.write_text(json.dumps({**good, "model": {**good["model"], "vocab": "many"}}))
    elif case == "huge id":
        vocab = {**good["model"]["vocab"], "zzz": 2**31}
        path.write_text(json.dumps({**good, "model": {**good["model"], "vocab": vocab}}))
    return path


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "no such file"),
        ("directory", "not a regular file (a directory)"),
        ("not JSON", "not valid JSON"),
        ("not UTF-8", "not valid JSON"),
        ("deep JSON", "not valid JSON"),
        ("a JSON list", "not a tokenizer.json"),
        ("config.json", "not a tokenizer.json"),
        ("unknown model", "not a valid tokenizer"),
        ("vocab not a dict", "not a valid tokenizer"),
        ("huge id", "over the limit"),
    ],
)
def test_hostile_files_refused(tmp_path, trained, case, reason):
    path = _hostile(tmp_path, case, trained)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_file(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message


def test_file_over_the_size_bound_refused(tmp_path, trained, monkeypatch):
    path = tmp_path / "tokenizer.json"
    trained.save(path)
    monkeypatch.setattr(text, "MAX_TOKENIZER_BYTES", path.stat().st_size - 1)
    with pytest.raises(TokenizerError, match=r"larger than the limit of [\d,]+ bytes$") as e:
        Tokenizer.from_file(path)
    assert str(e.value).startswith(f"{path}: ")
    monkeypatch.setattr(text, "MAX_TOKENIZER_BYTES", path.stat().st_size)
    assert Tokenizer.from_file(path).vocab_size == trained.vocab_size


def test_error_names_a_hostile_file_name_on_one_line(tmp_path):
    path = tmp_path / "evil\nname\x1b[2J.json"
    path.write_text("not json")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_file(path)
    message = str(e.value)
    assert "\n" not in message and "\x1b" not in message and "evil\\nname\\x1b[2J" in message


@pytest.mark.parametrize("length", [1, 0, -5, True, 2.5, "77", 1 << 20])
def test_bad_context_length_refused(trained, tmp_path, length):
    path = tmp_path / "tokenizer.json"
    trained.save(path)
    with pytest.raises((TypeError, ValueError)):
        Tokenizer.from_file(path, context_length=length)
    with pytest.raises((TypeError, ValueError)):
        Tokenizer(trained.backend, context_length=length)


@pytest.mark.parametrize(
    "texts", [None, 42, b"bytes", [b"bytes"], ["fine", None], ("fine", 3), {"a": 1}, iter(["a"])]
)
def test_non_text_refused(trained, texts):
    with pytest.raises(TypeError):
        trained(texts)


def test_empty_batch(trained):
    assert trained([]).shape == (0, 77)


def test_train_tokenizer_refuses_bad_arguments():
    with pytest.raises(TypeError):
        train_tokenizer("one caption, trained on as characters")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        train_tokenizer(["a caption", 7])
    for size in (10, 257, 2**30):
        with pytest.raises(ValueError, match="vocab_size"):
            train_tokenizer(CAPTIONS, vocab_size=size)
