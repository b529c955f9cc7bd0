"""Model files from strangers: every bad file is one CheckpointError naming it, found before any
memory is spent on the model it claims to be."""

import contextlib
import json
import math
import resource
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.test_convert import _write_google_npz
from vitkit import CheckpointError, create_model, load_model, load_pretrained, save_model
from vitkit.cli import main
from vitkit.config import PRESETS
from vitkit.model.vit import ViT, count_params, state_shapes
from vitkit.weights.foreign import read_state_dict
from vitkit.weights.hf import from_hf, to_hf
from vitkit.weights.timm import from_timm, to_timm

# Refusing a file may take this long and grow the process's peak memory this much.
SECONDS = 1.0
MEGABYTES = 200


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def frugal():
    """Assert that the block takes under SECONDS and raises the peak RSS by under MEGABYTES;
    address space is capped meanwhile, so code that tries to allocate a huge model fails
    fast instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status_kb("VmSize") * 1024 + 2 * 2**30
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmHWM")
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert elapsed < SECONDS, f"took {elapsed:.2f} s"
    assert _status_kb("VmHWM") - before < MEGABYTES * 1024


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "m"
    save_model(create_model("Ti/4@28", seed=0), path, labels=[f"c{i}" for i in range(10)])
    return path


@pytest.fixture
def model_dir(saved_once, tmp_path):
    return Path(shutil.copytree(saved_once, tmp_path / "m"))


def _set_config(directory: Path, **fields) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


# -- config.json -------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
BAD_CONFIGS = [
    ("mlp_ratio", -1),
    ("mlp_ratio", INF),
    ("mlp_ratio", 10**9),
    ("ln_eps", -1),
    ("ln_eps", NAN),
    ("mean", [NAN]),
    ("mean", [INF]),
    ("std", [NAN]),
    ("std", [INF]),
    ("width", 2**20),
    ("depth", 10**6),
    ("heads", 10**9),
    ("num_registers", 10**9),
    ("num_classes", 10**12),
    ("image_size", 2**20),
    ("resnet_layers", [10**9]),
]


@pytest.mark.parametrize(("field", "value"), BAD_CONFIGS, ids=[f"{f}={v}" for f, v in BAD_CONFIGS])
def test_bad_config_values_refused_fast_and_without_memory(model_dir, field, value):
    extra = {"patch_size": 1} if field == "resnet_layers" else {}  # stride 4 fits 28 px
    _set_config(model_dir, **{field: value}, **extra)
    with frugal(), pytest.raises(CheckpointError) as e:
        load_model(model_dir)
    assert str(model_dir / "config.json") in str(e.value)
    assert f"ViTConfig.{field}" in str(e.value)


def test_parameter_count_bounded_before_building(model_dir):
    # Each size within its own bound, together some 39 billion parameters.
    _set_config(model_dir, width=16384, heads=128, depth=12)
    with frugal(), pytest.raises(CheckpointError, match=r"config.json: .*parameters, more than"):
        load_model(model_dir)


@pytest.mark.slow
def test_state_shapes_are_the_models():
    grey = PRESETS["Ti/4@28"]
    configs = [
        *(c.replace(depth=1) for c in PRESETS.values()),  # one block: quick to build
        grey.replace(num_registers=4, cls_pos_embed=False),
        grey.replace(pool="mean", class_token=False, fc_norm=True, qkv_bias=False),
        grey.replace(num_classes=0, mlp_ratio=2.5),
        grey.replace(resnet_layers=(1, 2), resnet_stem="small", resnet_width=32, patch_size=1),
    ]
    for config in configs:
        model = ViT(config)
        assert state_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert count_params(config) == count_params(model)
    assert count_params(PRESETS["H/14"]) == 632_045_800  # the paper's count, with a 1000-class head


# -- model.safetensors and calibration.safetensors ------------------------------------
def _write_lying_header(path: Path, state: dict, name: str, shape: tuple[int, ...]) -> None:
    """`state` as safetensors, but the header declares tensor `name` (last in the file) as
    float32 of `shape`, far more data than follows."""
    header, chunks, offset = {}, [], 0
    for k, v in state.items():
        if k != name:
            data = v.contiguous().numpy().tobytes()
            header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset]}
            header[k]["data_offsets"].append(offset + len(data))
            chunks.append(data)
            offset += len(data)
    end = offset + 4 * math.prod(shape)
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(chunks) + bytes(64))


def test_weights_of_a_much_larger_model_refused_before_building_it(model_dir):
    # A 2.4-billion-parameter config beside the small model's weights.
    _set_config(model_dir, width=4096, heads=16, depth=12)
    with frugal(), pytest.raises(CheckpointError) as e:
        load_model(model_dir)
    message = str(e.value)
    assert str(model_dir / "model.safetensors") in message and "blocks.0.attn.qkv.weight" in message


def test_truncated_tensor_of_2_to_the_40_elements_named(model_dir):
    state = create_model("Ti/4@28").state_dict()
    _write_lying_header(model_dir / "model.safetensors", state, "pos_embed", (2**20, 2**20))
    with frugal(), pytest.raises(CheckpointError) as e:
        load_model(model_dir)
    assert str(model_dir / "model.safetensors") in str(e.value) and "pos_embed" in str(e.value)


def test_integer_weights_refused(model_dir):
    state = create_model("Ti/4@28").state_dict()
    state["norm.weight"] = torch.ones(192, dtype=torch.int32)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor norm.weight is I32"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("images", "fake"),
    [
        (torch.zeros(2000, 1, 28, 28, dtype=torch.uint8), False),  # more than calibration takes
        (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), True),  # declares 2**33 bytes, has 800
    ],
)
def test_calibration_bounded_by_its_header(model_dir, images, fake):
    path = model_dir / "calibration.safetensors"
    if fake:
        _write_lying_header(path, {"images": images}, "images", (2**13, 1, 2**10, 2**10))
    else:
        save_file({"images": images}, path)
    with frugal(), pytest.raises(CheckpointError) as e:
        load_model(model_dir)
    assert str(path) in str(e.value)
    assert "images" in str(e.value)


# -- other libraries' files ------------------------------------------------------------
def _hf_dir(path: Path) -> Path:
    model = create_model("Ti/16", image_size=32, depth=2, num_classes=3)
    model.labels = ["a", "b", "c"]
    return to_hf(model, path)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ([1, 2], "JSON object"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": NAN}, "hidden_size"),
        ({"num_hidden_layers": "12"}, "num_hidden_layers"),
        ({"layer_norm_eps": "tiny"}, "layer_norm_eps"),
        ({"id2label": {"x": "a", "1": "b", "2": "c"}}, "id2label"),
        ({"id2label": ["a", "b", "c"]}, "id2label"),
    ],
)
def test_hugging_face_config_fields_named(tmp_path, config, field):
    directory = _hf_dir(tmp_path / "hf")
    path = directory / "config.json"
    if isinstance(config, dict):
        config = json.loads(path.read_text()) | config
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(directory)
    assert str(path) in str(e.value) and field in str(e.value)


@pytest.mark.parametrize("preprocessor", [[0.5], {"image_mean": "grey", "image_std": 0.5}])
def test_hugging_face_preprocessor_named(tmp_path, preprocessor):
    directory = _hf_dir(tmp_path / "hf")
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    with pytest.raises(CheckpointError, match=r"preprocessor_config.json: "):
        from_hf(directory)


def test_timm_tensors_that_do_not_fit_one_model(tmp_path):
    state = to_timm(create_model("Ti/4@28", depth=2))
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 192)  # block 0 says 768
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"odd.safetensors: .*blocks.1.mlp.fc1.weight"):
        from_timm(tmp_path / "odd.safetensors")
    state = to_timm(create_model("Ti/4@28", depth=1))
    state["cls_token"] = torch.zeros(1, 1, 192, dtype=torch.int64)
    torch.save(state, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match=r"int.pth: tensor cls_token is torch.int64"):
        read_state_dict(tmp_path / "int.pth")


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel", np.zeros((192, 100)), "fc1"),
        ("embedding/kernel", np.zeros((4, 4, 1, 192), dtype=np.int32), "embedding/kernel"),
    ],
)
def test_google_npz_that_does_not_fit_one_model(tmp_path, key, value, named):
    model = create_model("Ti/4@28", depth=2)
    # vitkit's tensor names are timm's: the test writer takes it as a timm model.
    blocks = [SimpleNamespace(attn=SimpleNamespace(num_heads=3))] * 2
    ref = SimpleNamespace(state_dict=model.state_dict, embed_dim=192, blocks=blocks)
    _write_google_npz(ref, tmp_path / "g.npz", big_vision=False)
    with np.load(tmp_path / "g.npz") as f:
        arrays = dict(f) | {key: value}
    np.savez(tmp_path / "g.npz", **arrays)
    with pytest.raises(CheckpointError, match=rf"g.npz.*{named}"):
        load_pretrained(tmp_path / "g.npz")


# -- the command line --------------------------------------------------------------
def test_cli_one_line_naming_the_file_and_traceback_on_request(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("VITKIT_DEBUG", raising=False)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage, not JSON")
    assert main(["info", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(weights) in err and "Traceback" not in err
    assert main(["--debug", "info", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("vitkit info: error: ")
    _set_config(model_dir, width=2**20)
    assert main(["info", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "config.json: ViTConfig.width" in err


def test_cli_unexpected_error_is_one_line(model_dir, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("torch said\nsomething long")

    monkeypatch.setattr("vitkit.weights.load_model", broken)
    monkeypatch.delenv("VITKIT_DEBUG", raising=False)
    assert main(["info", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "vitkit info: error: RuntimeError: torch said something long "
        "(run with --debug for the traceback)\n"
    )
    monkeypatch.setenv("VITKIT_DEBUG", "1")
    assert main(["info", str(model_dir)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cli_reading_a_foreign_file_that_upsets_torch(tmp_path, capsys):
    state = to_timm(create_model("Ti/4@28", depth=1))
    state["reg_token"] = torch.zeros(5)  # registers need (1, N, D)
    save_file(state, tmp_path / "t.safetensors")
    assert main(["convert", str(tmp_path / "t.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(tmp_path / "t.safetensors") in err


# -- writing -----------------------------------------------------------------------
def test_save_model_removes_the_previous_models_files(model_dir):
    trained = create_model("Ti/4@28", seed=1)
    trained.calibration = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    save_model(trained, model_dir, labels=[str(i) for i in range(10)])
    stale = [model_dir / "labels.json", model_dir / "calibration.safetensors"]
    assert all(path.is_file() for path in stale)
    save_model(create_model("Ti/4@28", seed=2), model_dir)
    assert not any(path.exists() for path in stale)
    loaded = load_model(model_dir)
    assert loaded.labels is None and loaded.calibration is None


def test_convert_to_timm_writes_atomically(tmp_path, monkeypatch):
    src = tmp_path / "t.safetensors"
    save_file(to_timm(create_model("Ti/4@28", depth=1)), src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous file")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    assert main(["convert", str(src), str(out), "--to", "timm"]) != 0
    assert (out / "model.safetensors").read_bytes() == b"the previous file"
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]  # no temporary file left
    monkeypatch.undo()
    assert main(["convert", str(src), str(out), "--to", "timm"]) == 0
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert from_timm(out / "model.safetensors").config.depth == 1


# -- Hub names: a revision, and the commit it resolved to -------------------------------
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub's downloads, answered from a cache-like folder; records their calls."""
    import huggingface_hub

    snapshot = tmp_path / "hub" / "models--org--vit" / "snapshots" / SHA
    _hf_dir(snapshot)
    timm_file = tmp_path / "hub" / "models--timm--tiny" / "snapshots" / SHA / "model.safetensors"
    timm_file.parent.mkdir(parents=True)
    save_file(to_timm(create_model("Ti/4@28", depth=1)), timm_file)
    calls = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        return str(snapshot)

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, revision))
        return str(timm_file)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_hub_revision_passed_and_commit_recorded(fake_hub, tmp_path):
    model = load_pretrained("hf:org/vit@v1.0")
    assert fake_hub[-1] == ("org/vit", "v1.0")
    assert model.config.source == f"hf:org/vit@{SHA}"
    save_model(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved/config.json").read_text())["source"] == f"hf:org/vit@{SHA}"
    assert load_model(tmp_path / "saved").config.source == f"hf:org/vit@{SHA}"
    model = load_pretrained("timm:tiny")
    assert fake_hub[-1] == ("timm/tiny", None)
    assert model.config.source == f"timm:tiny@{SHA}"
    assert main(["convert", f"timm:tiny@{SHA[:7]}", str(tmp_path / "c")]) == 0
    assert fake_hub[-1] == ("timm/tiny", SHA[:7])
    assert json.loads((tmp_path / "c/config.json").read_text())["source"] == f"timm:tiny@{SHA}"
    with pytest.raises(CheckpointError, match="expected hf:<repo>"):
        load_pretrained("hf:org/vit@")


@pytest.mark.slow
def test_fine_tuning_from_the_hub_records_the_commit_in_train_json(fake_hub, tmp_path):
    from vitkit.train import TrainConfig, train

    cfg = TrainConfig.from_dict(
        {"data": "digits", "init": "timm:tiny@v2", "batch_size": 64, "max_steps": 2}
    )
    train(cfg, tmp_path / "run", progress=False)
    assert fake_hub[-1] == ("timm/tiny", "v2")
    assert json.loads((tmp_path / "run/train.json").read_text())["init"] == f"timm:tiny@{SHA}"
    assert load_model(tmp_path / "run").config.source == f"timm:tiny@{SHA}"
