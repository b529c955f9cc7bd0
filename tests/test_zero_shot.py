"""Zero-shot classification with a CLIP, and contrastive (LiT, CLIP) training: text labels
select the right class on a toy model trained here, through the API and the commands."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.clip_toy import SHADES, TEMPLATES, shades, small_tower, train_toy_clip
from tests.fashion import load_fashion_mnist
from vitkit.cli import main
from vitkit.data.captions import captions_from_labels, load_captioned_folder
from vitkit.infer import Classifier
from vitkit.infer.zero_shot import (
    check_labels,
    check_templates,
    class_embeddings,
    load_tokenizer,
    read_descriptions,
    read_labels_file,
    split_labels,
    zero_shot_model,
)
from vitkit.train.contrastive import ContrastiveConfig, contrastive_loss, train_contrastive
from vitkit.weights import CheckpointError, load_pretrained, save_model
from vitkit.weights.clip import load_clip


@pytest.fixture(scope="module")
def lit_dir(tmp_path_factory):
    """The toy LiT (tests/clip_toy.py)."""
    out = tmp_path_factory.mktemp("lit")
    train_toy_clip(out)
    return out


def test_text_labels_select_the_right_class(lit_dir):
    test = shades(60, 1)
    classifier = Classifier(lit_dir, labels=SHADES, templates=TEMPLATES)
    predictions = classifier.predict(test.images)
    top = [p.labels[0][0] for p in predictions]
    accuracy = sum(t == SHADES[y] for t, y in zip(top, test.labels.tolist(), strict=True)) / 60
    assert accuracy >= 0.9
    # The labels' order is the user's, and the probabilities are a distribution over them.
    reordered = Classifier(lit_dir, labels=SHADES[::-1], templates=TEMPLATES)
    assert [p.labels[0][0] for p in reordered.predict(test.images)] == top
    assert abs(sum(pr for _, pr in predictions[0].labels) - 1) < 1e-5


def test_prompt_ensembling_averages_normalised_embeddings(lit_dir):
    clip, tokenizer_file = load_clip(lit_dir)
    tokenizer = load_tokenizer(clip, tokenizer_file)
    both = class_embeddings(clip, tokenizer, SHADES, TEMPLATES)
    each = [class_embeddings(clip, tokenizer, SHADES, [t]) for t in TEMPLATES]
    expected = torch.nn.functional.normalize(each[0] + each[1], dim=-1)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)
    model = zero_shot_model(clip, tokenizer, SHADES, TEMPLATES)
    assert model.labels == SHADES and model.config.num_classes == 3
    assert clip.visual.config.num_classes != 3  # the CLIP itself is left as it was


def test_descriptions_are_averaged_with_a_labels_prompts(lit_dir):
    """A label's embedding is the mean of its prompts' and its descriptions' unit embeddings;
    a label the descriptions lack keeps its prompts alone."""
    clip, tokenizer_file = load_clip(lit_dir)
    tokenizer = load_tokenizer(clip, tokenizer_file)
    described = {"dark": ["a black square", "no light at all"], "elsewhere": ["ignored"]}
    got = class_embeddings(clip, tokenizer, SHADES, TEMPLATES, described)
    with torch.no_grad():
        unit = torch.nn.functional.normalize(
            clip.encode_text(
                tokenizer([*(t.format("dark") for t in TEMPLATES), *described["dark"]])
            ),
            dim=-1,
        )
    torch.testing.assert_close(
        got[0], torch.nn.functional.normalize(unit.mean(dim=0), dim=-1), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(got[1:], class_embeddings(clip, tokenizer, SHADES[1:], TEMPLATES))
    assert not torch.allclose(got[0], class_embeddings(clip, tokenizer, SHADES, TEMPLATES)[0])


def test_descriptions_caption_their_class(tmp_path):
    data = shades(6, 0)
    described = {"grey": ["between black and white"]}
    pairs = captions_from_labels(data, TEMPLATES, descriptions=described)
    for captions, label in zip(pairs.captions, data.labels.tolist(), strict=True):
        name = SHADES[label]
        assert captions[: len(TEMPLATES)] == [t.format(name) for t in TEMPLATES]
        assert captions[len(TEMPLATES) :] == described.get(name, [])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('["a list"]', "map each label"),
        ('{"cat": "not a list"}', "list of sentences"),
        ('{"cat": [""]}', "1 to"),
        ('{"cat": [' + ",".join(['"x"'] * 101) + "]}", "over 100"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_descriptions_files_are_refused(tmp_path, text, match):
    path = tmp_path / "descriptions.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=match) as e:
        read_descriptions(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_predict_and_eval_commands(lit_dir, tmp_path, capsys):
    test = shades(30, 2)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).save(path)
        paths.append(str(path))
    args = ["predict", str(lit_dir), *paths, "--labels", "dark, grey,bright", "--json"]
    args += ["--template", TEMPLATES[0], "--template", TEMPLATES[1], "--precision", "fp32"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["predictions"][0]["label"] for r in rows] == SHADES

    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("dark\n\ngrey\nbright\n")
    folder = tmp_path / "data"
    for i, (image, label) in enumerate(zip(test.images, test.labels, strict=True)):
        (folder / SHADES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / SHADES[label] / f"{i}.png")
    out = tmp_path / "eval"
    args = ["eval", str(lit_dir), "--data", str(folder), "--split", "val", "--zero-shot"]
    args += ["--val-fraction", "0.5", "--template", TEMPLATES[0], "--out", str(out), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] >= 0.8
    # Descriptions from a file join the prompts; without --zero-shot they are refused.
    described = tmp_path / "described.json"
    described.write_text(json.dumps({"bright": ["a bright one"]}))
    assert main([*args, "--descriptions", str(described)]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] >= 0.8
    args = ["eval", str(lit_dir), "--data", str(folder), "--descriptions", str(described)]
    assert main(args) == 2
    assert "go with --zero-shot" in capsys.readouterr().err
    assert (out / "eval.json").is_file()


def test_zero_shot_needs_a_clip(tmp_path, capsys):
    save_model(small_tower(), tmp_path / "vit")
    with pytest.raises(CheckpointError, match="zero-shot needs a text tower"):
        Classifier(tmp_path / "vit", labels=["a", "b"])
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    assert main(["predict", str(tmp_path / "vit"), str(image), "--labels", "a,b"]) == 2
    err = capsys.readouterr().err.strip()
    assert "zero-shot needs a text tower" in err and "\n" not in err


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (["cat"], "at least 2 labels"),
        (["cat", "dog", "cat"], "distinct"),
        (["cat", " "], "printable line"),
        (["cat", "a\nb"], "printable line"),
        ("cat,dog", "list of strings"),
    ],
)
def test_bad_labels_are_refused(labels, match):
    with pytest.raises(ValueError, match=match):
        check_labels(labels)


@pytest.mark.parametrize("templates", [["no slot"], ["{} and {}"], [], "a {}"])
def test_bad_templates_are_refused(templates):
    with pytest.raises(ValueError):
        check_templates(templates)


def test_label_lists(tmp_path):
    assert split_labels(" cat, dog ,,a red car ") == ["cat", "dog", "a red car"]
    (tmp_path / "l.json").write_text('["a", "b"]')
    assert read_labels_file(tmp_path / "l.json") == ["a", "b"]
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(CheckpointError, match="JSON list"):
        read_labels_file(tmp_path / "bad.json")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CheckpointError, match="UTF-8"):
        read_labels_file(tmp_path / "bin.txt")


def test_equal_captions_share_their_target():
    """Two images with the same caption: each caption counts as a positive of both, so the
    perfectly aligned batch costs only the targets' own entropy."""
    image = torch.eye(3)[[0, 0, 1]]
    ids = torch.tensor([[1, 5, 2], [1, 5, 2], [1, 6, 2]])
    loss = contrastive_loss(image, image, ids, torch.tensor(100.0))
    floor = (2 / 3) * torch.log(torch.tensor(2.0))  # two rows of entropy log 2, one of 0
    assert abs(loss.item() - floor.item()) < 1e-3


def test_train_clip_on_a_captioned_folder(tmp_path, capsys):
    """A CLIP from scratch (both towers trained) on image + .txt pairs, through the command;
    an image without a caption file is left out."""
    data = shades(24, 3)
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {SHADES[label]} square\nsomething {SHADES[label]}\n")
    (folder / "0.txt").unlink()
    pairs = load_captioned_folder(folder, 28, 1)
    assert len(pairs) == 23 and len(pairs.skipped) == 1 and "no caption file" in pairs.skipped[0][1]
    out = tmp_path / "clip"
    args = ["train-clip", "--data", str(folder), "--model", "Ti/4@28", "--steps", "3"]
    args += ["--batch-size", "8", "--text-width", "32", "--text-depth", "1", "--out", str(out)]
    assert main(args) == 0
    clip, _ = load_clip(out)
    assert clip.visual.config.num_classes == clip.visual.config.width
    summary = json.loads((out / "contrastive.json").read_text())
    assert summary["pairs"] == 23 and not summary["config"]["lock_image"]


def test_a_locked_tower_does_not_change(lit_dir):
    clip, _ = load_clip(lit_dir)
    tower = small_tower()
    state = clip.visual.state_dict()
    for name, value in tower.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(state[name], value), name


@pytest.mark.slow
def test_lit_on_fashion_mnist_classifies_seen_classes_by_name(tmp_path):
    """LiT on the shipped model's locked features, 3,000 images of 7 classes: zero-shot
    against the 7 names on test images of those classes."""
    train = load_fashion_mnist("train")
    seen = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Sneaker"]
    pairs = captions_from_labels(train.subset(torch.arange(4300)), TEMPLATES, seen)
    tower = load_pretrained("fashion-mnist")
    pairs.images = torch.nn.functional.interpolate(pairs.images.float(), size=32).byte()
    config = ContrastiveConfig(steps=150, batch_size=128, text_width=64, text_depth=2)
    result = train_contrastive(tower, pairs, config, progress=False)
    test = load_fashion_mnist("test")
    keep = torch.isin(test.labels, torch.tensor([test.classes.index(c) for c in seen]))
    model = zero_shot_model(result.clip, result.tokenizer, test.classes, TEMPLATES)
    classifier = Classifier(model)
    images = torch.nn.functional.interpolate(test.images[keep][:700].float(), size=32).byte()
    top = [p.labels[0][0] for p in classifier.predict(images)]
    truth = [test.classes[i] for i in test.labels[keep][:700].tolist()]
    accuracy = sum(a == b for a, b in zip(top, truth, strict=True)) / len(truth)
    assert accuracy >= 0.85


def test_info_describes_both_towers(lit_dir, capsys):
    assert main(["info", str(lit_dir)]) == 0
    out = capsys.readouterr().out
    assert "CLIP text tower: 32w x 1 blocks x 2 heads" in out and "image embedding 32-d" in out
    assert main(["info", str(lit_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text_config"]["width"] == 32


def test_train_clip_on_webdataset_shards_of_images_and_captions(tmp_path, capsys):
    """image + txt samples in tar shards (WebDataset's layout, written by its TarWriter); a
    sample without a caption and a damaged shard are left out with their reason."""
    import io

    import webdataset as wds

    from vitkit.data.captions import load_captioned_shards, shard_paths

    data = shades(12, 4)
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"pairs-{shard:03d}.tar")) as sink:
            for i in range(shard * 6, shard * 6 + 6):
                png = io.BytesIO()
                Image.fromarray(data.images[i, 0].numpy()).save(png, "PNG")
                sample = {"__key__": f"{i:04d}", "png": png.getvalue()}
                if i != 3:
                    sample["txt"] = f"a {SHADES[data.labels[i]]} square"
                sink.write(sample)
    (tmp_path / "pairs-002.tar").write_bytes(b"not a tar at all" * 40)
    paths = shard_paths(tmp_path / "pairs-{000..002}.tar")
    assert [p.name for p in paths] == ["pairs-000.tar", "pairs-001.tar", "pairs-002.tar"]
    pairs = load_captioned_shards(paths, 28, 1)
    assert len(pairs) == 11 and pairs.captions[0] == ["a dark square"]
    reasons = " | ".join(reason for _, reason in pairs.skipped)
    assert "without both an image and a txt caption" in reasons and "not a readable tar" in reasons
    torch.testing.assert_close(pairs.images[0], data.images[0])
    out = tmp_path / "clip"
    args = ["train-clip", "--data", str(tmp_path), "--model", "Ti/4@28", "--steps", "2"]
    args += ["--batch-size", "4", "--text-width", "32", "--text-depth", "1", "--out", str(out)]
    assert main(args) == 0
    assert json.loads((out / "contrastive.json").read_text())["pairs"] == 11
