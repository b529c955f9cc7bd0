"""A run directory is attacker input, and a training process can die at any moment: resume
never unpickles, never follows a path out of `checkpoints/`, falls back to the state before a
broken one, and a run killed over and over ends bitwise where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import test_train
from vitkit import load_model
from vitkit.train import TrainConfig, train
from vitkit.weights import CheckpointError

# The training tests' tiny digits model, narrower (22 steps an epoch at batch 64).
TINY = test_train.TINY | {"width": 32}


def tiny_config(**kw) -> TrainConfig:
    settings = {
        "model_overrides": TINY,
        "ema_decay": 0.9,
        "augment": {"crop_padding": 1, "mixup": 0.2},
    }
    return test_train.tiny_config(**settings | kw)


class _Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (its directory, its final weights)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config(), run, progress=False)
    return run, load_model(run).state_dict()


def _same_weights(run: Path, weights: dict[str, torch.Tensor]) -> bool:
    mine = load_model(run).state_dict()
    return mine.keys() == weights.keys() and all(torch.equal(mine[k], weights[k]) for k in mine)


@pytest.mark.parametrize(
    "pointer",
    [
        {"shards": "step-5"},  # the pickled format of earlier versions, at its usual place
        {"shards": "../elsewhere"},
        {"shards": "ABSOLUTE"},
        {"state": "../elsewhere"},
        {"state": "ABSOLUTE"},
        {"state": "step-5/../../elsewhere"},
    ],
)
def test_a_planted_pickle_never_runs(tmp_path, pointer):
    """last.json, a matching train.json and a pickled shard index: the payload never runs,
    and resume says what it refused."""
    run, marker, elsewhere = tmp_path / "run", tmp_path / "pwned", tmp_path / "elsewhere"
    ckpt = run / "checkpoints"
    for index in (ckpt / "step-5/.metadata", elsewhere / ".metadata"):
        _plant(index, marker)
    for key, value in pointer.items():
        pointer[key] = str(elsewhere) if value == "ABSOLUTE" else value
    cfg = tiny_config().to_dict()
    meta = {"step": 5, "best_val_acc": None, "train_config": cfg, "model_config": {}}
    (ckpt / "last.json").write_text(json.dumps(meta | pointer))
    (run / "train.json").write_text(json.dumps(cfg))
    _plant(ckpt / "last.pt", marker)
    with pytest.raises(CheckpointError, match="nothing to resume") as e:
        train(TrainConfig(), run, resume=True, progress=False)
    message = str(e.value)
    assert "refused" in message and "last.json" in message and "last.pt" in message
    assert "never read" in message  # the pickled index in step-5
    assert not marker.exists()


@pytest.mark.slow
def test_a_planted_pointer_next_to_real_states_is_refused_and_resume_goes_on(
    tmp_path, reference, capsys
):
    run = tmp_path / "run"
    train(tiny_config(max_steps=30), run, progress=False)
    _plant(tmp_path / "elsewhere/.metadata", tmp_path / "pwned")
    (run / "checkpoints/last.json").write_text(json.dumps({"state": str(tmp_path / "elsewhere")}))
    resumed = train(TrainConfig(), run, resume=True, progress=False)
    assert "refused" in capsys.readouterr().err
    assert resumed.step == 44 and _same_weights(run, reference[1])
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_the_previous_state_is_kept_and_used_when_the_newest_is_broken(tmp_path, reference, capsys):
    """Saving every step keeps two states; the newest one truncated, resume falls back to the
    one before it, says so, and still ends bitwise where the uninterrupted run does."""
    run = tmp_path / "run"
    train(tiny_config(max_steps=13, save_every=0.0), run, progress=False)
    states = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert states == ["last.json", "step-12", "step-13"]
    shard = sorted((run / "checkpoints/step-13").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = train(TrainConfig(), run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "step-13" in err and "resuming from" in err and "step-12" in err
    assert resumed.step == 44 and _same_weights(run, reference[1])


def test_a_state_of_another_model_is_a_clear_error(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    train(tiny_config(max_steps=3), run, progress=False)
    train(tiny_config(max_steps=3, model_overrides=TINY | {"width": 16}), other, progress=False)
    for shard in (run / "checkpoints/step-3").glob("*.safetensors"):
        shard.unlink()
    for shard in (other / "checkpoints/step-3").glob("*.safetensors"):
        (run / "checkpoints/step-3" / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(CheckpointError, match=r"step-3: does not hold this run's model"):
        train(TrainConfig(), run, resume=True, progress=False)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"step": 4}, "step"),
        ({"format": 0}, "format"),
        ({"param_groups": {"lr": 1}}, "param_groups"),
        ({"epoch_sums": ["a", 1, 2]}, "epoch_sums"),
        ({"train_config": {"epochs": "many"}}, "epochs"),
        ({"train_config": {"no_such_setting": 1}}, "no_such_setting"),
        ({"model_config": {"width": 2**40}}, "width"),
    ],
)
@pytest.mark.slow
def test_a_tampered_state_json_is_refused_naming_the_file(tmp_path, change, field):
    run = tmp_path / "run"
    train(tiny_config(max_steps=3), run, progress=False)
    path = run / "checkpoints/step-3/state.json"
    meta = json.loads(path.read_text())
    for key, value in change.items():
        meta[key] = meta[key] | value if key.endswith("_config") else value
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=field) as e:
        train(TrainConfig(), run, resume=True, progress=False)
    assert "state.json" in str(e.value)


@pytest.mark.slow
def test_leftovers_of_a_kill_are_removed_and_a_torn_log_does_not_block(tmp_path, reference, capsys):
    run = tmp_path / "run"
    train(tiny_config(max_steps=22), run, progress=False)
    leftovers = [
        run / ".model.safetensors.x1.tmp",
        run / "best/.config.json.x2.tmp",
        run / "checkpoints/.last.json.x3.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"half")
    (run / "checkpoints/step-30.partial").mkdir()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2.0, "st')
    resumed = train(TrainConfig(), run, resume=True, progress=False)
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    assert not any(p.exists() for p in leftovers)
    assert not (run / "checkpoints/step-30.partial").exists()
    assert resumed.step == 44 and _same_weights(run, reference[1])
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [22, 44]


def _cli(run: Path, *extra: str, resume: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "vitkit", "train", "--quiet"]
    if resume:
        return [*argv, "--resume", str(run), *extra]
    flags = [f"--set={k}={v}" for k, v in TINY.items()]
    return [
        *argv,
        *("--data", "digits", "--model", "Ti/4@28", "--batch-size", "64", "--lr", "2e-3"),
        *("--precision", "fp32", "--ema-decay", "0.9", "--out", str(run), *flags, *extra),
    ]


# One thread per process, so that a run and its resumptions compute alike whatever the machine.
_ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def _wait(what, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _saved_steps(run: Path) -> set[int]:
    ckpt = run / "checkpoints"
    names = os.listdir(ckpt) if ckpt.is_dir() else []
    return {int(n[5:]) for n in names if n.startswith("step-") and n[5:].isdigit()}


@pytest.mark.slow
def test_killed_over_and_over_ends_where_an_uninterrupted_run_does(tmp_path):
    """SIGKILL at random moments, half of them while a state is being written, each time
    resumed: the final weights equal an uninterrupted run's, bit for bit."""
    epochs = ["--epochs", "3", "--save-every", "0"]
    reference = tmp_path / "reference"
    subprocess.run(_cli(reference, *epochs), env=_ENV, check=True, timeout=300)
    run, rng, kills = tmp_path / "run", random.Random(0), 0
    for cycle in range(6):
        proc = subprocess.Popen(_cli(run, *epochs, resume=cycle > 0), env=_ENV)
        before = max(_saved_steps(run), default=0)
        try:
            _wait(lambda b=before: max(_saved_steps(run), default=0) > b, proc)
            if cycle % 2:  # mid-write: as soon as a state is being written
                ckpt = run / "checkpoints"
                _wait(lambda c=ckpt: any(n.endswith(".partial") for n in os.listdir(c)), proc)
            else:
                time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.kill()
            proc.wait()
        kills += proc.returncode == -signal.SIGKILL
    done = subprocess.run(_cli(run, resume=True), env=_ENV, timeout=300)
    assert done.returncode == 0 and kills >= 5
    a, b = (load_file(d / "model.safetensors") for d in (reference, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "train.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_its_own_code(tmp_path):
    """SIGTERM (`docker stop`, a cluster taking the machine back) mid-epoch: the step ends,
    the state is saved at it, the exit code is 128 + 15; resume carries on from there."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(run, "--epochs", "500"), env=_ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        _wait(lambda: (run / "checkpoints/last.json").is_file(), proc)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    step = int(re.search(r"step (\d+)/", out).group(1))
    assert step in _saved_steps(run)
    resumed = train(TrainConfig(max_steps=step + 5), run, resume=True, progress=False)
    assert resumed.step == step + 5
