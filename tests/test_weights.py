import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vitkit import CheckpointError, create_model, load_model, save_model, top_k
from vitkit.cli import main


@pytest.fixture
def saved(tmp_path):
    model = create_model("Ti/4@28", seed=1)
    torch.nn.init.normal_(model.head.weight)
    labels = [f"class {i}" for i in range(10)]
    save_model(model, tmp_path / "m", labels=labels)
    return model, tmp_path / "m"


def test_save_load_bitwise_identical(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "labels.json",
        "model.safetensors",
    ]
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.labels == [f"class {i}" for i in range(10)]
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_no_pickle_in_checkpoint(saved):
    """Every file is JSON or safetensors, read as such: neither a pickle nor torch.save's zip."""
    _, path = saved
    for f in path.iterdir():
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            assert f.suffix == ".safetensors", f
            with safe_open(f, framework="pt") as st:  # a zip or a pickle fails to parse here
                assert list(st.keys())
        assert not f.read_bytes().startswith((b"PK\x03\x04", b"\x80"))
    assert json.loads((path / "config.json").read_text())["patch_size"] == 4


def test_load_at_other_size(saved):
    _, path = saved
    model = load_model(path, image_size=56)
    assert model.pos_embed.shape[1] == 1 + 14 * 14
    assert model(torch.randn(1, 1, 56, 56)).shape == (1, 10)


def test_missing_files(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="needs config.json"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model(path / "nowhere")


def test_truncated_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(path)


def test_weights_of_another_architecture(saved, tmp_path):
    _, path = saved
    other = create_model("Ti/4@28", width=96, heads=3)
    save_file(other.state_dict(), path / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatches: .*patch_embed.proj.weight"):
        load_model(path)
    deeper = create_model("Ti/4@28", depth=7)
    save_file(deeper.state_dict(), path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensors: blocks.6"):
        load_model(path)


def test_bad_config_and_labels(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    (path / "labels.json").write_text('["only one"]')
    with pytest.raises(CheckpointError, match="1 labels for a model with 10 classes"):
        load_model(path)
    (path / "config.json").write_text(json.dumps(cfg | {"depth": "six"}))
    with pytest.raises(CheckpointError, match="depth must be int"):
        load_model(path)
    (path / "config.json").write_text(json.dumps(cfg | {"rope": True}))
    with pytest.raises(CheckpointError, match="unknown ViTConfig field"):
        load_model(path)


def test_top_k():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    out = top_k(logits, k=2, labels=["a", "b", "c"])
    assert [name for name, _ in out[0]] == ["b", "c"] and out[1][0][0] == "a"
    p = torch.tensor([0.0, 2.0, 1.0]).softmax(-1)
    assert out[0][0][1] == pytest.approx(p[1].item())
    assert sum(prob for _, prob in top_k(logits, k=3)[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 labels for 3 classes"):
        top_k(logits, labels=["a", "b"])


def test_cli_create_info_models(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["create", "Ti/7@28", str(out), "--num-classes", "4", "--seed", "2"]) == 0
    assert load_model(out).config.num_classes == 4
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in load_model(out).parameters())
    assert main(["models"]) == 0
    assert "86,567,656" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "not a model directory" in capsys.readouterr().err
