"""Shards at an address (HTTP, a command's output): fetched once into the cache as they
stream, checked, then read exactly as the same shards on disk."""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_data_shards import SHARD_BYTES, make_folder
from vitkit.cli import main
from vitkit.data import shard_fetch
from vitkit.data.dataset import DatasetError
from vitkit.data.inspect import inspect_source
from vitkit.data.shard_fetch import fetch_shards, is_remote
from vitkit.data.shard_source import open_shards
from vitkit.data.shards import MANIFEST, pack_folder
from vitkit.data.sources import open_source


@pytest.fixture
def packed(tmp_path) -> Path:
    """A shard set of a few shards, in site/set/ (the server's folder)."""
    make_folder(tmp_path / "photos")
    out = tmp_path / "site" / "set"
    pack_folder(tmp_path / "photos", out, SHARD_BYTES)
    assert len(list(out.glob("*.tar"))) >= 3
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "shards"


@contextlib.contextmanager
def serving(root: Path) -> Iterator[tuple[str, Counter]]:
    """`root` over HTTP on a loopback port: its URL, and how often each path was asked for."""
    asked: Counter = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            asked[self.path] += 1
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def samples(source) -> list[tuple[bytes, int]]:
    return [(source.read(i).read(), source.labels[i]) for i in range(len(source))]


def test_addresses_are_told_from_paths():
    for spec in (
        "https://h/set/shards.json",
        "http://h/s-{0..3}.tar",
        "pipe:cat a.tar",
        "gs://b/x",
    ):
        assert is_remote(spec)
    for spec in ("shards/", "a-{000..003}.tar", "C:/data/a.tar", Path("pipe:x"), "hf:owner/name"):
        assert not is_remote(spec)


def test_a_manifest_address_is_fetched_once_and_reads_as_the_local_set(packed, cache):
    local = open_shards(packed)
    with serving(packed.parent) as (url, asked):
        spec = f"{url}/set/{MANIFEST}"
        fetched = open_source(spec, "train", val_fraction=0.25)
        held_out = open_source(spec, "val", val_fraction=0.25)
    # Every file once: the second split, like a later run, reads the copies.
    assert set(asked.values()) == {1} and len(asked) == 1 + len(local.shards)
    assert fetched.name == "set" and fetched.classes == local.classes
    assert len(fetched) + len(held_out) == len(local)
    assert sorted(samples(fetched) + samples(held_out)) == sorted(samples(local))
    # The server is gone: the cached copy is complete and still opens.
    assert len(open_source(spec, "train", val_fraction=0.25)) == len(fetched)
    assert sum(inspect_source(spec).counts) == len(local)
    [copy] = cache.iterdir()
    assert (copy / "SOURCE").read_text() == spec + "\n"
    assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]


def test_a_pattern_through_a_command_reads_as_the_same_shards(packed):
    last = len(list(packed.glob("*.tar"))) - 1
    pattern = f"shards-{{000000..{last:06d}}}.tar"
    spec, name = fetch_shards(f"pipe:cat {packed}/{pattern}")
    assert name == "shards" and spec.endswith(pattern)
    assert samples(open_shards(spec)) == samples(open_shards(str(packed / pattern)))


def test_processes_started_together_fetch_each_shard_once(packed):
    with serving(packed.parent) as (url, asked):
        spec = f"{url}/set/"
        threads = [threading.Thread(target=fetch_shards, args=(spec,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert set(asked.values()) == {1}


def test_an_interrupted_fetch_resumes_at_the_first_missing_shard(packed):
    last = sorted(packed.glob("*.tar"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[:-1])
    with serving(packed.parent) as (url, asked):
        with pytest.raises(DatasetError, match="its manifest says"):
            fetch_shards(f"{url}/set/")
        last.write_bytes(data)
        fetch_shards(f"{url}/set/")
    shards = sorted(packed.glob("*.tar"))
    assert all(asked[f"/set/{p.name}"] == (2 if p == last else 1) for p in shards)


def one_line(spec: str, match: str) -> str:
    with pytest.raises(DatasetError, match=match) as e:
        fetch_shards(spec)
    assert len(str(e.value).splitlines()) == 1
    return str(e.value)


def test_bad_fetches_are_one_line_errors_and_keep_nothing(packed, cache, monkeypatch):
    first = packed / "shards-000000.tar"
    data = first.read_bytes()
    with serving(packed.parent) as (url, _):
        spec = f"{url}/set/{MANIFEST}"
        first.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
        assert one_line(spec, "SHA-256 differs from its manifest's; not kept").startswith(url)
        first.write_bytes(data + b"\0" * 512)
        one_line(spec, "larger than its manifest says; not kept")
        first.write_bytes(data[:-512])
        one_line(spec, f"{len(data) - 512:,} bytes, its manifest says {len(data):,}")
        first.write_bytes(data)
        one_line(f"{url}/nowhere/{MANIFEST}", "cannot fetch")
        (packed / MANIFEST).write_text('{"format": "something else"}')
        one_line(spec, f"^{url}/set/{MANIFEST}: not a shard set manifest")
        monkeypatch.setattr(shard_fetch, "MAX_SHARD_BYTES", len(data) - 1)
        pattern = f"{url}/set/shards-{{000000..000001}}.tar"
        one_line(pattern, "shards-000000.tar: larger than .* kB; not kept")
    kept = [p.name for p in cache.rglob("*") if p.suffix in (".tar", ".tmp", ".json", ".fetched")]
    assert kept == []  # nothing half-fetched or unchecked stays
    monkeypatch.setattr(shard_fetch, "DISK_MARGIN", shutil.disk_usage(cache).free + (1 << 40))
    one_line(f"pipe:cat {first}", "less than .* free; not kept")
    one_line("pipe:exit 3", "pipe:exit 3: cannot fetch: .*exit 3")
    one_line("s3://bucket/shards-0.tar", "give the command .* 'pipe:aws s3 cp s3://bucket")


@pytest.mark.slow
def test_training_reads_a_served_set(packed, tmp_path, capsys):
    with serving(packed.parent) as (url, _):
        argv = ["train", "--data", f"{url}/set/{MANIFEST}", "--model", "Ti/4@28"]
        argv += ["--set=image_size=16", "--set=width=32", "--set=depth=1", "--set=heads=2"]
        argv += ["--stream", "--precision", "fp32"]
        argv += ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--quiet"]
        assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
