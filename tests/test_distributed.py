"""Training on several processes (gloo on CPU): the same run as on one process, sharded or not;
resumed on another number of processes; stopped with a clear error when a process dies."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from tests.paths import ROOT
from vitkit import load_model
from vitkit.data import load_dataset, stream_source
from vitkit.train import TrainConfig, train

# One block of width 32 on 8x8 digits (16 patches of 2x2), with an EMA and mixup so that every
# piece of state and every random draw crosses the processes. No stochastic depth: its masks
# are drawn per micro-batch, so they differ with the number of processes.
SETTINGS = {
    "data": "digits",
    "model": "Ti/4@28",
    "model_overrides": {
        "image_size": 8,
        "patch_size": 2,
        "width": 32,
        "depth": 1,
        "heads": 2,
        "drop_path": 0.0,
    },
    "epochs": 2,
    "batch_size": 30,  # cut into parts of 7 and 8 images on 2 processes x 2 micro-batches
    "lr": 2e-3,
    "warmup_epochs": 0.5,
    "ema_decay": 0.9,
    "precision": "fp32",
    "augment": {"crop_padding": 1, "mixup": 0.2},
}
TOLERANCE = 1e-5
DIES_AT_STEP = 3  # the dying rank exits once this many steps are done


def _config(**kw) -> TrainConfig:
    return TrainConfig.from_dict(SETTINGS | kw)


@pytest.fixture(scope="module")
def digits():
    """A few hundred training images (8 steps an epoch) and a small held-out set."""
    pytest.importorskip("sklearn")
    return (
        load_dataset("digits", "train").subset(torch.arange(256)),
        load_dataset("digits", "test").subset(torch.arange(64)),
    )


@pytest.fixture(scope="module")
def single(digits, tmp_path_factory):
    """The reference: the whole run in this process alone (no process group)."""
    run = tmp_path_factory.mktemp("single")
    result = train(_config(), run, progress=False, datasets=digits)
    return result, load_model(run).state_dict()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_at(step: int):
    """A step hook that ends the process abruptly, as a crash would, once `step` steps are done."""

    def hook(done: int) -> None:
        if done == step:
            os._exit(3)

    return hook


def _worker(rank, world, port, cfg, run_dir, resume, datasets, dies) -> None:
    """One process of a job, told its place as torchrun would tell it."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        VITKIT_DIST_TIMEOUT="30",
    )
    torch.set_num_threads(1)
    on_step = _die_at(DIES_AT_STEP) if dies and rank == world - 1 else None
    try:
        train(cfg, run_dir, resume=resume, progress=False, datasets=datasets, on_step=on_step)
    except Exception as e:
        Path(run_dir, f"error-{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None


def _spawn(world, cfg, run_dir, datasets, resume=False, dies=False, timeout=60.0):
    """Run `world` processes of one job to their end; their exit codes and elapsed seconds."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world, port, cfg, run_dir, resume, datasets, dies))
        for rank in range(world)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.1, timeout - (time.perf_counter() - start)))
    elapsed = time.perf_counter() - start
    for p in procs:
        if p.is_alive():  # a hang: the test fails, without leaving processes behind
            p.kill()
            p.join()
    return [p.exitcode for p in procs], elapsed


def _assert_close(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < TOLERANCE, worst


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_like_one(single, digits, tmp_path, shard):
    """The same global batch on 2 processes, 2 micro-batches each, as on one process."""
    cfg = _config(shard=shard, grad_accum=2)
    codes, _ = _spawn(2, cfg, tmp_path / "run", digits)
    assert codes == [0, 0]
    _assert_close(load_model(tmp_path / "run").state_dict(), single[1])
    # Sharded, each process writes its own safetensors shard; no pickle in either form.
    state = (
        tmp_path
        / "run/checkpoints"
        / json.loads((tmp_path / "run/checkpoints/last.json").read_text())["state"]
    )
    writers = {p.name.split("-model-")[0] for p in state.glob("*.safetensors")}
    assert writers == ({"shard-00001", "shard-00002"} if shard else {"shard-00001"})
    assert sorted(p.name for p in state.iterdir() if p.suffix != ".safetensors") == ["state.json"]


@pytest.mark.slow
def test_resume_on_another_number_of_processes(single, digits, tmp_path):
    """Stopped mid-epoch on 2 processes, sharded, then finished on 1; and a run begun on 1
    process finished on 2: both end where the uninterrupted run does."""
    full, weights = single
    sharded = tmp_path / "sharded"
    codes, _ = _spawn(2, _config(shard=True, max_steps=5), sharded, digits)
    assert codes == [0, 0]
    resumed = train(TrainConfig(), sharded, resume=True, progress=False, datasets=digits)
    assert resumed.step == full.step
    _assert_close(load_model(sharded).state_dict(), weights)

    plain = tmp_path / "plain"
    stopped = train(_config(max_steps=11), plain, progress=False, datasets=digits)
    assert stopped.step == 11
    codes, _ = _spawn(2, TrainConfig(), plain, digits, resume=True)
    assert codes == [0, 0]
    _assert_close(load_model(plain).state_dict(), weights)


@pytest.mark.slow
def test_a_dying_process_stops_the_job_with_a_clear_error(digits, tmp_path):
    codes, elapsed = _spawn(2, _config(), tmp_path, digits, dies=True)
    assert codes == [1, 3], codes
    assert elapsed < 30, elapsed  # not the collective timeout: the lost peer is noticed
    error = (tmp_path / "error-0.txt").read_text()
    assert error.startswith("LostProcessError: process 0 of 2: another process"), error


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    """`torchrun -m vitkit train` as a user would run it: one report, a whole model."""
    run = tmp_path / "run"
    args = ["--data", "digits", "--batch-size", "64", "--max-steps", "4", "--quiet"]
    args += ["--set", "image_size=8", "--set", "patch_size=2", "--set", "width=32"]
    args += ["--set", "depth=1", "--set", "heads=2", "--shard", "--out", str(run)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "-m", "vitkit", "train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("held-out accuracy") == 1, done.stdout
    assert load_model(run).config.width == 32


# Run by torchrun in each process: `vitkit train` as on the command line, its training stream's
# dataset wrapped so that every sample it decodes appends "epoch index" to this process's file.
READ_LOGGING_TRAIN = """
import os
import sys
from pathlib import Path

from torch.utils.data import Dataset

from vitkit.cli import main
from vitkit.data import ImageStream
from vitkit.train import setup

LOG = Path(sys.argv[1]) / f"reads-{os.environ['RANK']}.txt"


class Logged(Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        epoch, index = key
        with LOG.open("a") as f:
            f.write(f"{epoch} {index}\\n")
        return self.data[key]


load_splits = setup.load_splits


def logged_splits(*args, **kwargs):
    train, held_out = load_splits(*args, **kwargs)
    assert isinstance(train, ImageStream), type(train)
    train._data = Logged(train._data)
    return train, held_out


setup.load_splits = logged_splits
raise SystemExit(main(sys.argv[2:]))
"""


def _noise_folder(root: Path, classes: int, per_class: int, side: int) -> None:
    """`classes` subfolders of `per_class` PNGs of random colour pixels."""
    gen = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(256, (side, side, 3), dtype=torch.uint8, generator=gen)
            Image.fromarray(pixels.numpy()).save(root / f"class{c}" / f"{i:02d}.png")


@pytest.mark.slow
def test_torchrun_streamed_ranks_read_disjoint_halves_of_every_epoch(tmp_path):
    """Two processes streaming an image folder: every epoch, each reads its own slice of each
    batch, and together they read each sample of the epoch's whole batches exactly once."""
    folder, logs = tmp_path / "shapes", tmp_path / "logs"
    _noise_folder(folder, classes=4, per_class=12, side=16)
    logs.mkdir()
    script = tmp_path / "train_logged.py"
    script.write_text(READ_LOGGING_TRAIN)
    epochs, batch, accum = 2, 7, 2  # slices of 3 and 4 images, each cut into 2 micro-batches
    args = ["train", "--data", str(folder), "--stream", "--workers", "1", "--val-fraction", "0.25"]
    args += ["--epochs", str(epochs), "--batch-size", str(batch), "--grad-accum", str(accum)]
    args += ["--set", "image_size=8", "--set", "patch_size=2", "--set", "width=32"]
    args += ["--set", "depth=1", "--set", "heads=2", "--precision", "fp32", "--quiet"]
    args += ["--out", str(tmp_path / "run")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", str(script), str(logs), *args],
        cwd=ROOT,
        env=os.environ | {"VITKIT_DIST_TIMEOUT": "60"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr

    samples = len(stream_source(folder, "train", 8, 3, val_fraction=0.25))
    assert samples == 36  # 9 of each class's 12
    steps = samples // batch
    used = steps * batch  # whole batches only: 35 of the 36
    reads = {}  # (rank, epoch) -> the sample indices read, in order
    for rank in (0, 1):
        for line in (logs / f"reads-{rank}.txt").read_text().splitlines():
            epoch, index = map(int, line.split())
            reads.setdefault((rank, epoch), []).append(index)
    assert sorted(reads) == [(r, e) for r in (0, 1) for e in range(epochs)]
    for epoch in range(epochs):
        first, second = reads[0, epoch], reads[1, epoch]
        assert (len(first), len(second)) == (steps * 3, steps * 4)
        assert not set(first) & set(second)
        together = sorted(first + second)
        assert together == sorted(set(together)), "a sample read twice in one epoch"
        assert len(together) == used and set(together) <= set(range(samples))
    for rank in (0, 1):
        assert reads[rank, 0] != reads[rank, 1]  # each epoch in its own order
    assert load_model(tmp_path / "run").config.width == 32
