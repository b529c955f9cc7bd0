"""The evaluation crop stored with a model (`crop_pct`, timm's convention): the box, parity
with timm's eval transform, the config field, prediction, the service, and converters."""

import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vitkit import PRESETS, CheckpointError, ViTConfig, create_model, load_model, save_model
from vitkit.cli import main
from vitkit.data.preprocess import centre_crop, centre_square, load_image
from vitkit.infer import Classifier
from vitkit.infer.explain import explain_image
from vitkit.serve.decode import decode_image
from vitkit.serve.routes import _explain
from vitkit.weights import load_pretrained
from vitkit.weights.hf import from_hf, to_hf
from vitkit.weights.timm import from_timm

# timm resizes the shorter side to a whole number of pixels (floor(S / crop_pct)), the longer
# side in proportion (rounded down), and cuts the crop at whole-pixel offsets; vitkit resizes
# the exact box in one step. On smooth images that shifts the result by under a pixel: a few
# levels of 255 at most, far less on average.
MEAN_TOL = 2 / 255
MAX_TOL = 8 / 255


def test_centre_crop_box_on_a_non_square_image():
    assert centre_crop(0.875)(400, 300) == pytest.approx((0.171875, 0.0625, 0.828125, 0.9375))
    assert centre_crop(0.875)(300, 400) == pytest.approx((0.0625, 0.171875, 0.9375, 0.828125))
    assert centre_crop(0.5)(64, 56) == pytest.approx((18 / 64, 14 / 56, 46 / 64, 42 / 56))
    assert centre_crop(1.0) is centre_square  # keeps _decode's exact-pixel path
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="crop_pct"):
            centre_crop(bad)


def test_a_crop_applies_to_an_image_already_at_the_input_size():
    pixels = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    img = Image.fromarray(pixels)
    want = img.resize((28, 28), Image.Resampling.BICUBIC, box=(7, 7, 21, 21))
    got = load_image(img, 1, 28, crop=centre_crop(0.5))
    assert np.array_equal(got[0].numpy(), np.asarray(want))
    assert np.array_equal(load_image(img, 1, 28)[0].numpy(), pixels)


def _smooth(width: int, height: int) -> Image.Image:
    """A smooth colour image: random colours 8 x 6, upscaled."""
    cells = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)


# Landscape, portrait, and one large enough to be reduced before it is resized.
@pytest.mark.parametrize(("width", "height"), [(320, 240), (240, 320), (1000, 750)])
def test_load_image_matches_timms_eval_transform(timm, tmp_path, width, height):
    size, path = 128, tmp_path / "smooth.png"
    _smooth(width, height).save(path)
    transform = timm.data.create_transform(
        input_size=(3, size, size),
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    with Image.open(path) as img:
        want = transform(img.convert("RGB"))
    got = load_image(path, 3, size, crop=centre_crop(0.875)).float() / 255
    assert got.shape == want.shape == (3, size, size)
    diff = (got - want).abs()
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL
    # The whole centre square is another image altogether.
    whole = load_image(path, 3, size).float() / 255
    assert (whole - want).abs().mean() > 5 * MEAN_TOL


def test_config_round_trip_and_old_configs(tmp_path):
    config = ViTConfig(crop_pct=0.875)
    assert config.to_dict()["crop_pct"] == 0.875
    assert ViTConfig.from_json(config.to_json()) == config
    assert ViTConfig.from_json(config.to_json()).crop_pct == 0.875
    assert config != ViTConfig()
    old = ViTConfig().to_dict()
    del old["crop_pct"]
    assert ViTConfig.from_dict(old).crop_pct == 1.0
    assert ViTConfig.from_dict(old | {"crop_pct": 1}).crop_pct == 1  # JSON may write 1.0 as 1
    for bad in (0, -0.1, 1.01, math.nan, math.inf, True, "0.9"):
        with pytest.raises(ValueError, match="crop_pct"):
            ViTConfig(crop_pct=bad)
    assert {p.crop_pct for p in PRESETS.values()} == {1.0}
    # A model directory keeps it; one saved before the field existed loads with 1.0.
    save_model(create_model("Ti/4@28", depth=1, crop_pct=0.9), tmp_path / "m")
    assert load_model(tmp_path / "m").config.crop_pct == 0.9
    path = tmp_path / "m" / "config.json"
    saved = json.loads(path.read_text())
    del saved["crop_pct"]
    path.write_text(json.dumps(saved))
    assert load_model(tmp_path / "m").config.crop_pct == 1.0


@pytest.fixture
def models():
    """The same weights with crop_pct 1.0 and 0.5."""
    whole = create_model("Ti/4@28", seed=0, width=32, heads=2, depth=2).eval()
    torch.nn.init.normal_(whole.head.weight, generator=torch.Generator().manual_seed(0))
    half = copy.deepcopy(whole)
    half.config = half.config.replace(crop_pct=0.5)
    return whole, half


@pytest.fixture
def photo(tmp_path):
    """A 64 x 56 grey image as a PNG, and its centre half (28 x 28, the models' input size)."""
    pixels = np.random.default_rng(1).integers(0, 256, (56, 64), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path, Image.fromarray(pixels[14:42, 18:46])


def _probabilities(classifier: Classifier, image) -> torch.Tensor:
    (prediction,) = classifier.predict(image, top_k=10)
    return torch.tensor([p for _, p in sorted(prediction.labels)])


def test_predict_crops_as_the_model_says(models, photo):
    whole, half = models
    path, centre = photo
    by_hand = _probabilities(Classifier(whole), centre)
    cropped = _probabilities(Classifier(half), path)
    assert torch.allclose(cropped, by_hand, atol=1e-6)
    assert torch.allclose(_probabilities(Classifier(half), Image.open(path)), by_hand, atol=1e-6)
    assert (_probabilities(Classifier(whole), path) - by_hand).abs().max() > 1e-3


def test_service_and_explain_crop_as_the_model_says(models, photo):
    whole, half = models
    path, centre = photo
    pixels = decode_image(path.read_bytes(), half.config, 10**7)
    assert torch.equal(pixels, load_image(centre, 1, 28))
    # /v1/explain explains the decoded pixels as they are, without cropping them again.
    labels = _explain(half, pixels, "rollout", 3)[0]
    want = explain_image(whole, centre, "rollout", 3)
    assert [name for name, _ in labels] == [name for name, _ in want.labels]
    assert [p for _, p in labels] == pytest.approx([p for _, p in want.labels], abs=1e-6)
    got = explain_image(half, path, "rollout", 3)
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))


def test_service_decodes_a_jpeg_at_a_scale_that_covers_the_crop(models, tmp_path):
    # A 224-pixel JPEG decodes at 1/8 scale for a 28-pixel input, but its centre half needs 1/4.
    _, half = models
    data = io.BytesIO()
    _smooth(224, 224).convert("L").save(data, "JPEG", quality=95)
    (tmp_path / "photo.jpg").write_bytes(data.getvalue())
    want = load_image(tmp_path / "photo.jpg", 1, 28, crop=centre_crop(0.5))
    assert torch.equal(decode_image(data.getvalue(), half.config, 10**7), want)


def test_timm_model_keeps_timms_crop_pct(timm, tmp_path, capsys):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    assert from_timm(ref).config.crop_pct == ref.pretrained_cfg["crop_pct"] == 0.9
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=1, pretrained_cfg_overlay={"crop_pct": 0.8}
    )
    assert from_timm(ref).config.crop_pct == 0.8
    assert from_timm(ref.state_dict()).config.crop_pct == 1.0  # weights alone do not say
    # A file takes the pretrained_cfg of the config.json beside it, as in a Hub repository.
    from timm.models._hub import save_config_for_hf

    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    assert load_pretrained(tmp_path / "model.safetensors").config.crop_pct == 1.0
    save_config_for_hf(ref, tmp_path / "config.json")
    model = load_pretrained(tmp_path / "model.safetensors")
    assert model.config.crop_pct == 0.8
    save_model(model, tmp_path / "converted")
    assert main(["info", str(tmp_path / "converted")]) == 0
    assert "bicubic resize, crop_pct 0.8," in capsys.readouterr().out
    # A crop other than from the centre is not kept; a crop_pct out of range is refused.
    hub = json.loads((tmp_path / "config.json").read_text())
    hub["pretrained_cfg"]["crop_mode"] = "squash"
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert from_timm(tmp_path / "model.safetensors").config.crop_pct == 1.0
    hub["pretrained_cfg"] |= {"crop_mode": "center", "crop_pct": 1.2}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    with pytest.raises(CheckpointError, match=r"config.json: pretrained_cfg crop_pct .* 1.2"):
        from_timm(tmp_path / "model.safetensors")


def test_hf_image_processors_crop(transformers, tmp_path):
    directory = to_hf(create_model("Ti/4@32", depth=1, width=32, heads=2), tmp_path / "hf")
    assert from_hf(directory).config.crop_pct == 1.0  # ViTImageProcessor resizes, no crop
    processors = {
        "DeiTImageProcessor": 224 / 256,  # size 256, crop_size 224
        "PoolFormerImageProcessor": 0.9,  # crop_pct
        "BitImageProcessor": 1.0,  # shortest edge 224, crop 224
        "ConvNextImageProcessor": 1.0,  # crop_pct 0.875, ignored from 384 pixels up
        "ViTImageProcessor": 1.0,
    }
    for name, crop_pct in processors.items():
        getattr(transformers, name)().save_pretrained(directory)
        assert from_hf(directory).config.crop_pct == pytest.approx(crop_pct), name


@pytest.fixture
def shapes(tmp_path):
    """2 classes x 4 non-square PNGs."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "shapes" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (30 + 4 * i, 44, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "shapes" / cls / f"{i}.png")
    return tmp_path / "shapes"


def test_evaluation_data_is_cropped_as_the_model_says(shapes, capsys):
    from vitkit.data import ImageStream, load_dataset
    from vitkit.data.sources import open_source
    from vitkit.data.stream import decode_all
    from vitkit.train import TrainConfig
    from vitkit.train.setup import load_splits

    source = open_source(shapes, "val", val_fraction=0.5)
    by_hand = torch.stack(
        [load_image(source.read(i), 3, 16, crop=centre_crop(0.5)) for i in range(len(source))]
    )
    in_memory = load_dataset(str(shapes), "val", image_size=16, val_fraction=0.5, crop_pct=0.5)
    assert torch.equal(in_memory.images, by_hand)
    assert torch.equal(decode_all(source, 16, 3, workers=0, crop_pct=0.5).images, by_hand)
    streamed = ImageStream(source, 16, 3, workers=0, crop_pct=0.5)
    assert torch.equal(next(streamed.batches(0, range(len(source)), len(source)))[0], by_hand)
    assert not torch.equal(decode_all(source, 16, 3, workers=0).images, by_hand)
    # Training: the held-out part as the model evaluates, the training part uncropped.
    cfg = TrainConfig(data=str(shapes), val_fraction=0.5, stream=False, workers=0)
    train, val = load_splits(cfg, 16, 3, crop_pct=0.5)
    assert torch.equal(val.images, by_hand)
    assert torch.equal(
        train.images,
        decode_all(open_source(shapes, "train", val_fraction=0.5), 16, 3, workers=0).images,
    )
