"""A shard set split by fraction is indexed once for its training and held-out parts (each
tar's headers read once), and again only when a shard changes or the index is no longer
held."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
from PIL import Image

from vitkit.data import shard_source
from vitkit.data.shards import pack_folder
from vitkit.data.sources import open_source


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in range(3):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"c{c}" / f"{i}.png")
    pack_folder(folder, tmp_path / "shards", shard_bytes=8_000)
    return tmp_path / "shards"


@pytest.fixture
def indexed(monkeypatch):
    """The shards indexed so far, each as often as its headers were read."""
    calls = []
    real = shard_source.index_shard

    def counting(path, *args):
        calls.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(shard_source, "index_shard", counting)
    return calls


def test_split_by_fraction_is_indexed_once(shards, indexed):
    tars = sorted(p.name for p in shards.glob("*.tar"))
    assert len(tars) > 2
    train = open_source(shards, "train", val_fraction=0.25)
    val = open_source(shards, "val", val_fraction=0.25)
    assert sorted(indexed) == tars  # each tar once, not once per part
    assert train.source is val.source
    # The parts are disjoint and together hold every sample once.
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(36))
    keys = [train.source.keys[i] for i in train.indices + val.indices]
    assert len(set(keys)) == 36 and len(val) == 9

    # A shard rewritten is indexed again, with the rest.
    os.utime(shards / tars[0], ns=(0, 0))
    assert open_source(shards, "val", val_fraction=0.25).source is not val.source
    assert sorted(indexed) == sorted(tars * 2)

    # An index no longer held is not kept.
    del train, val
    gc.collect()
    open_source(shards, "train", val_fraction=0.25)
    assert sorted(indexed) == sorted(tars * 3)
