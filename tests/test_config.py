import json

import pytest

from piqa_core.config import PIQAConfig, PreprocessConfig, get_preset, list_presets


def test_presets_registered_with_aliases():
    assert {"dn-piqa", "tiny"} <= set(list_presets())
    assert get_preset("dn_piqa").to_dict() == get_preset("dn-piqa").to_dict()
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("nope")


def test_dn_piqa_matches_the_paper():
    cfg = get_preset("dn-piqa")
    assert cfg.model.backbone == "swin_base_patch4_window12_384" and cfg.model.backbone_kwargs == {}
    assert (cfg.preprocess.resize, cfg.preprocess.crop, cfg.preprocess.crop_mode) == (448, 384, "five")
    assert cfg.model.aux_dim == 495 and cfg.model.hidden_dim == 128 and cfg.model.dropout == 0.1
    assert (cfg.liqe.patch, cfg.liqe.stride, cfg.liqe.num_patches) == (224, 32, 15)
    assert cfg.face.margin == 20


def test_round_trip_through_json():
    for name in list_presets():
        cfg = get_preset(name)
        back = PIQAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="crop_mode"):
        PreprocessConfig(crop_mode="six")
    with pytest.raises(ValueError, match="unknown"):
        PIQAConfig.from_dict({"model": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"unknown config sections: \['detector'\]"):
        PIQAConfig.from_dict({**get_preset("tiny").to_dict(), "detector": {"size": 640}})
    d = get_preset("tiny").to_dict()
    d["liqe"]["enabled"] = False
    with pytest.raises(ValueError, match="aux_dim"):
        PIQAConfig.from_dict(d)
    d = get_preset("tiny").to_dict()
    d["preprocess"]["min_side"] = d["liqe"]["patch"] - 1  # would let images through that have no LIQE patch
    with pytest.raises(ValueError, match="below the 224-pixel LIQE patch"):
        PIQAConfig.from_dict(d)
    d["liqe"]["enabled"], d["model"]["aux_dim"] = False, 0
    assert PIQAConfig.from_dict(d).preprocess.min_side == 223  # without LIQE the bound is free


def test_presets_are_fresh_copies():
    a = get_preset("tiny")
    a.preprocess.crop = 1
    assert get_preset("tiny").preprocess.crop == 64
