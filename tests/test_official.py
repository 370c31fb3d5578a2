"""Importing the official release files: what import_official refuses and what it leaves alone."""

import copy

import pytest

from piqa_core.checkpoints import CheckpointError, build_bundle
from piqa_core.config import get_preset
from piqa_core.official import import_official
from tests.test_checkpoints import official_layout, openai_layout


@pytest.fixture(scope="module")
def official():
    src = build_bundle("tiny", text_features=False)
    return official_layout(src.model), openai_layout(src.liqe), src.detector.net.state_dict()


def test_the_callers_config_is_not_changed(official):
    cfg = get_preset("tiny")
    cfg.liqe.clip_cfg = {"embed_dim": 1}  # whatever the caller had: LIQE.pt's CLIP is used, in a copy
    before = copy.deepcopy(cfg)
    bundle = import_official(*official, config=cfg)
    assert cfg == before and bundle.config.liqe.clip_cfg["embed_dim"] != 1


def test_configs_the_official_files_cannot_fill_are_refused(official):
    no_liqe = get_preset("tiny")
    no_liqe.liqe.enabled = False
    with pytest.raises(ValueError, match="the official model takes LIQE features"):
        import_official(*official, config=no_liqe)
    other_patch = get_preset("tiny")
    other_patch.liqe.patch = 336  # after construction, as a notebook might
    with pytest.raises(CheckpointError, match=r"^LIQE \(a state dict\): its CLIP takes 224-px images, but the config "
                                              r"cuts 336-px LIQE patches"):
        import_official(*official, config=other_patch)
