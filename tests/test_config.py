import json

import pytest

from vitkit import PRESETS, ViTConfig


def test_json_round_trip_every_preset():
    for cfg in PRESETS.values():
        assert ViTConfig.from_json(cfg.to_json()) == cfg


def test_json_ints_accepted_for_floats():
    d = PRESETS["Ti/16"].to_dict() | {"mlp_ratio": 4, "ln_eps": 1}
    assert ViTConfig.from_dict(d).mlp_ratio == 4


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"widht": 10}, "unknown ViTConfig field"),
        ({"depth": "12"}, "depth must be int"),
        ({"qkv_bias": 1}, "qkv_bias must be bool"),
        ({"pool": "max"}, "pool must be"),
        ({"mean": [0.5]}, "one value per input channel"),
        ({"width": 100, "heads": 3}, "not divisible by heads"),
        ({"image_size": 30}, "not a multiple of patch_size"),
        ({"class_token": False}, "pool='cls' needs class_token"),
        ({"depth": 0}, "depth must be positive"),
        ({"drop_path": 1.5}, "drop_path must be in"),
        ({"resnet_layers": [], "patch_size": 1}, "at least one stage"),
        ({"resnet_layers": [3], "resnet_width": 48, "patch_size": 1}, "multiple of 32"),
        ({"resnet_layers": [3, 4], "image_size": 200}, r"token stride 128 \(CNN stride 8"),
        ({"resnet_stem": "deep"}, "resnet_stem must be"),
    ],
)
def test_bad_config_fields_rejected(patch, message):
    d = PRESETS["Ti/16"].to_dict() | patch
    with pytest.raises(ValueError, match=message):
        ViTConfig.from_json(json.dumps(d))


def test_not_json_and_not_object():
    with pytest.raises(ValueError, match="not valid JSON"):
        ViTConfig.from_json("{")
    with pytest.raises(ValueError, match="JSON object"):
        ViTConfig.from_json("[1, 2]")


def test_replace_adapts_normalisation_to_channels():
    grey = PRESETS["S/16"].replace(in_channels=1)
    assert grey.mean == (0.5,) and grey.std == (0.5,)
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        PRESETS["S/16"].replace(colour=True)
