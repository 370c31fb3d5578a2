import io
import json
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch

from piqa_core.checkpoints import (
    CheckpointError,
    build_bundle,
    clean_state_dict,
    load_checkpoint,
    load_strict,
    save_checkpoint,
    torch_load,
)
from piqa_core.config import ModelConfig, get_preset
from piqa_core.model import DualBranchPIQA, build_backbone
from piqa_core.official import backbone_from_official, import_official, official_to_ours


def to_timm067_swin(backbone: torch.nn.Module) -> dict:
    """Inverse of timm's Swin filter: our timm 1.x layout → the timm 0.6.7 layout the official file uses.

    0.6.7 keeps downsample at the end of a stage and saves relative_position_index / attn_mask buffers.
    """
    out = {}
    for k, v in backbone.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k] = v.clone()
    for name, mod in backbone.named_modules():
        if hasattr(mod, "relative_position_index"):
            out[f"{name}.relative_position_index"] = mod.relative_position_index.clone()
        if getattr(mod, "attn_mask", None) is not None:
            out[f"{name}.attn_mask"] = mod.attn_mask.clone()
    assert "layers.0.downsample.reduction.weight" in out
    return out


def official_layout(model: DualBranchPIQA) -> dict:
    sd = {f"feature_extraction.feature_extraction.{k}": v for k, v in to_timm067_swin(model.backbone).items()}
    sd.update({f"feature_extraction_face.feature_extraction.feature_extraction.{k}": v
               for k, v in to_timm067_swin(model.backbone_face).items()})
    sd.update({f"quality.{k}": v.clone() for k, v in model.head.state_dict().items()})
    return sd


def openai_layout(liqe) -> dict:
    """What the official LIQE.pt looks like: OpenAI CLIP keys, partly fp16, plus three JIT-era ints."""
    sd = {k: (v.half() if v.dim() >= 2 else v.clone()) for k, v in liqe.clip.state_dict().items()}
    sd.update({"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
               "vocab_size": torch.tensor(49408)})
    return sd


def legacy_zip(sd: dict) -> bytes:
    """The torch-hub release format of retinaface-pytorch: a zip with one torch file inside."""
    inner = io.BytesIO()
    torch.save(sd, inner)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("retinaface_resnet50_2020-07-20.pth", inner.getvalue())
    return out.getvalue()


def _inputs(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=g), torch.randn(2, 3, size, size, generator=g), \
        torch.randn(2, 495, generator=g)


@pytest.mark.parametrize("preset", ["tiny", pytest.param("dn-piqa", marks=pytest.mark.slow)])
def test_official_layout_round_trip_is_exact(preset, tmp_path):
    cfg = get_preset(preset)
    torch.manual_seed(1)
    source = DualBranchPIQA(cfg.model).eval()
    path = tmp_path / "PIQ_model.pth"
    torch.save(official_layout(source), path)

    torch.manual_seed(2)
    target = DualBranchPIQA(cfg.model).eval()
    load_strict(target, official_to_ours(torch_load(path), target), "DN-PIQA")
    x = _inputs(cfg.preprocess.crop)
    with torch.inference_mode():
        assert torch.equal(source(*x), target(*x))


TIMM067 = Path(__file__).parent / "fixtures" / "timm067_piq_model.pt"


def test_official_file_saved_by_timm067_scores_identically():
    """A miniature PIQ_model saved by timm 0.6.7 itself (tests/fixtures/make_timm067_piq_model.py):
    the remap meets the real old layout, not our inverse of it, and reproduces its scores."""
    fx = torch.load(TIMM067, weights_only=True)
    assert any(k.endswith("layers.0.downsample.reduction.weight") for k in fx["state_dict"])
    cfg = ModelConfig(backbone_kwargs=fx["swin_kwargs"])
    model = DualBranchPIQA(cfg).eval()
    load_strict(model, official_to_ours(fx["state_dict"], model), "PIQ_model (timm 0.6.7)")
    whole = build_backbone(cfg).eval()
    load_strict(whole, backbone_from_official(fx["state_dict"], whole), "Swin (timm 0.6.7)")
    with torch.inference_mode():
        torch.testing.assert_close(model(fx["x"], fx["x_face"], fx["aux"]), fx["out"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(whole(fx["x"]), fx["whole_features"], rtol=1e-6, atol=1e-6)


def test_official_import_rejects_foreign_keys():
    model = DualBranchPIQA(get_preset("tiny").model)
    sd = official_layout(model)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        official_to_ours(sd, model)


def test_strict_load_names_missing_and_unexpected_keys():
    model = DualBranchPIQA(get_preset("tiny").model)
    sd = dict(model.state_dict())
    sd.pop("head.0.weight")
    sd["head.9.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_strict(model, sd, "model")
    msg = str(err.value)
    assert "missing (1): head.0.weight" in msg and "unexpected (1): head.9.weight" in msg


def test_shape_mismatch_is_explained():
    tiny = DualBranchPIQA(get_preset("tiny").model)
    sd = dict(tiny.state_dict())
    sd["head.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_strict(tiny, sd, "model")


def test_official_backbones_lsvq_and_gfiqa():
    cfg = get_preset("tiny")
    model = DualBranchPIQA(cfg.model)
    swin = to_timm067_swin(model.backbone)
    lsvq = {f"feature_extraction.{k}": v for k, v in swin.items()}
    lsvq.update({"quality.0.weight": torch.zeros(128, 10), "quality.1.weight": torch.zeros(1, 128)})
    gfiqa = {f"feature_extraction.feature_extraction.{k}": v for k, v in swin.items()}
    gfiqa.update({"quality.0.weight": torch.zeros(128, 10)})
    for sd in (lsvq, gfiqa):
        fresh = DualBranchPIQA(cfg.model)
        load_strict(fresh.backbone, backbone_from_official(sd, fresh.backbone), "backbone")
        x = torch.randn(1, 3, 64, 64)
        with torch.inference_mode():
            assert torch.equal(fresh.backbone.eval()(x), model.backbone.eval()(x))


def test_a_whole_model_as_a_backbone_file_gives_each_branch_its_own_weights():
    model = DualBranchPIQA(get_preset("tiny").model)
    sd = official_layout(model)  # PIQ_model.pth, say as --init-face: the face branch, not the whole one
    for branch, face in (("backbone", False), ("backbone_face", True)):
        fresh = DualBranchPIQA(get_preset("tiny").model)
        module = getattr(fresh, branch)
        load_strict(module, backbone_from_official(sd, module, face=face), branch)
        want = getattr(model, branch).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in module.state_dict().items())


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "hook": os.system}, path)
    with pytest.raises(CheckpointError, match="refused"):
        torch_load(path)


def test_prefixes_are_stripped():
    sd = clean_state_dict({"state_dict": {"module.a": 1, "_orig_mod.b": 2, "c": 3}})
    assert sd == {"a": 1, "b": 2, "c": 3}


def test_import_official_bundle_and_our_format_round_trip(tmp_path):
    cfg = get_preset("tiny")
    src = build_bundle(cfg, seed=3)
    (tmp_path / "PIQ_model.pth").write_bytes(b"")
    torch.save(official_layout(src.model), tmp_path / "PIQ_model.pth")
    torch.save(openai_layout(src.liqe), tmp_path / "LIQE.pt")
    (tmp_path / "retina.zip").write_bytes(legacy_zip(src.detector.net.state_dict()))

    bundle = import_official(tmp_path / "PIQ_model.pth", tmp_path / "LIQE.pt", tmp_path / "retina.zip",
                             config="tiny", model_id="official-test")
    assert not bundle.random_init
    assert torch.equal(bundle.model.state_dict()["head.0.weight"], src.model.state_dict()["head.0.weight"])
    # LIQE weights went through fp16 like the real file, so compare at that precision.
    w = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(bundle.liqe.clip.state_dict()[w], src.liqe.clip.state_dict()[w].half().float())
    assert torch.allclose(bundle.liqe.text_features.norm(dim=1), torch.ones(495), atol=1e-5)
    for k, v in src.detector.net.state_dict().items():
        assert torch.equal(bundle.detector.net.state_dict()[k], v), k

    digest = save_checkpoint(bundle, tmp_path / "model")
    loaded = load_checkpoint(tmp_path / "model")
    assert loaded.sha256 == digest == bundle.sha256
    assert loaded.model_id == "official-test" and loaded.config == bundle.config
    for a, b in ((bundle.model, loaded.model), (bundle.liqe, loaded.liqe), (bundle.detector, loaded.detector)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_missing_retinaface_names_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    src = build_bundle("tiny")
    torch.save(official_layout(src.model), tmp_path / "PIQ_model.pth")
    torch.save(openai_layout(src.liqe), tmp_path / "LIQE.pt")
    with pytest.raises(CheckpointError, match="retinaface_resnet50_2020-07-20-f168fae3c.zip"):
        import_official(tmp_path / "PIQ_model.pth", tmp_path / "LIQE.pt", config="tiny")


def test_a_model_dir_whose_config_and_weights_disagree_says_so(tmp_path):
    save_checkpoint(build_bundle("tiny"), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["model"]["hidden_dim"] = 64  # hand-edited: still verifies, since the hash covers the weights
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "m")
    msg = str(err.value)
    assert f"{tmp_path / 'm' / 'model.safetensors'}: model: the weights do not match" in msg
    assert "shape mismatch (3): head.0.bias: file (128,) vs model (64,)" in msg
    assert "config.json describes another model than its model.safetensors" in msg and "--preset" not in msg


def test_corrupt_or_foreign_model_dir(tmp_path):
    bundle = build_bundle("tiny")
    save_checkpoint(bundle, tmp_path / "m")
    blob = bytearray((tmp_path / "m" / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "m" / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_checkpoint(tmp_path / "empty")


def test_loaded_bundle_equals_saved_one_buffers_included(tmp_path):
    """Loading builds parameters on meta and assigns the file's tensors: nothing may stay uninitialised."""
    src = build_bundle("tiny", seed=4)
    save_checkpoint(src, tmp_path / "m")
    loaded = load_checkpoint(tmp_path / "m")
    for a, b in ((src.model, loaded.model), (src.liqe, loaded.liqe), (src.detector, loaded.detector)):
        for get in (lambda m: m.state_dict(), lambda m: dict(m.named_buffers())):  # buffers: non-persistent too
            sa, sb = get(a), get(b)
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    assert any(n.endswith("attn_mask") for n, _ in loaded.model.named_buffers())  # the derived buffer was rebuilt


def test_module_with_uninitialisable_buffer_is_refused(tmp_path):
    from piqa_core import checkpoints

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.register_buffer("twice", self.w.detach() * 2, persistent=False)

    with checkpoints._empty_parameters():
        m = Scaled()
    with pytest.raises(CheckpointError, match="uninitialised buffer"):
        load_strict(m, {"w": torch.ones(3)}, "scaled")


def test_empty_parameters_leave_other_threads_alone():
    import threading

    from piqa_core import checkpoints

    built = {}
    with checkpoints._empty_parameters():
        here = torch.nn.Linear(2, 2)
        t = threading.Thread(target=lambda: built.setdefault("other", torch.nn.Linear(2, 2)))
        t.start()
        t.join()
    assert here.weight.is_meta and not built["other"].weight.is_meta
    assert not torch.nn.Linear(2, 2).weight.is_meta  # and the patch is gone afterwards


def test_empty_parameters_overlapping_in_threads_restore_the_original():
    import threading

    from piqa_core import checkpoints

    original = torch.nn.Module.register_parameter
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with checkpoints._empty_parameters():
            a_in.set()
            b_in.wait()
        seen["a after"] = torch.nn.Linear(2, 2).weight.is_meta
        a_out.set()

    def b():
        a_in.wait()
        with checkpoints._empty_parameters():
            b_in.set()
            a_out.wait()  # A has left while B is still inside: B keeps building on meta
            seen["b inside"] = torch.nn.Linear(2, 2).weight.is_meta

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a after": False, "b inside": True}
    assert torch.nn.Module.register_parameter is original  # the last one out restores it


def test_file_replaced_during_load_is_refused(tmp_path, monkeypatch):
    from piqa_core import checkpoints

    save_checkpoint(build_bundle("tiny", seed=1), tmp_path / "m")
    save_checkpoint(build_bundle("tiny", seed=2), tmp_path / "other")
    hash_file = checkpoints._file_sha256

    def hash_then_replace(path):
        digest = hash_file(path)
        os.replace(tmp_path / "other" / "model.safetensors", path)
        return digest

    monkeypatch.setattr(checkpoints, "_file_sha256", hash_then_replace)
    with pytest.raises(CheckpointError, match="replaced while it was being loaded"):
        load_checkpoint(tmp_path / "m")


def test_random_bundles_are_deterministic_and_marked():
    a, b = build_bundle("tiny", seed=0), build_bundle("tiny", seed=0)
    assert a.random_init and a.model_id == "random-tiny-seed0"
    assert a.sha256 == b.sha256 != build_bundle("tiny", seed=1).sha256


def test_partial_bundles_hold_only_their_parts(tmp_path):
    whole = build_bundle("tiny", seed=3)
    face = build_bundle("tiny", seed=3, parts=("face",), text_features=False)
    assert face.model is None and face.liqe is None and face.parts == ("face",)
    # a part built alone is the same network as in the whole bundle (the Ray stages rely on it)
    assert all(torch.equal(a, b) for a, b in zip(face.detector.state_dict().values(),
                                                  whole.detector.state_dict().values()))
    scorer = build_bundle("tiny", seed=3, parts=("liqe", "model"))
    assert scorer.detector is None and scorer.parts == ("model", "liqe")
    assert torch.equal(scorer.liqe.text_features, whole.liqe.text_features)
    with pytest.raises(CheckpointError, match="whole bundle"):
        face.sha256
    digest = save_checkpoint(whole, tmp_path / "m")
    loaded = load_checkpoint(tmp_path / "m", parts=("face",))
    assert loaded.model is None and loaded.sha256 == digest  # a loaded part knows the file's digest
    with pytest.raises(ValueError, match="subset"):
        build_bundle("tiny", parts=("backbone",))


def test_other_swin_variant_is_refused_not_resampled():
    """timm's filter would interpolate a 4x4-window bias table into a 12x12 one; we must refuse."""
    tiny = get_preset("tiny")
    other = get_preset("tiny")
    other.model.backbone_kwargs = {**other.model.backbone_kwargs, "window_size": 8}
    sd = official_layout(DualBranchPIQA(tiny.model))
    with pytest.raises(CheckpointError, match="another Swin variant"):
        official_to_ours(sd, DualBranchPIQA(other.model))


def test_unreadable_files_are_named_checkpoint_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(100)}, good)
    files = {"truncated.pth": good.read_bytes()[:300], "notes.txt": b"hello\n", "empty.pth": b"",
             "random.bin": bytes(range(256)) * 4}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / name}: not a readable torch checkpoint")):
            torch_load(tmp_path / name)
    with pytest.raises(CheckpointError, match="^s3://b/x.pt: not a readable"):
        torch_load(b"nope", where="s3://b/x.pt")


def test_unknown_preset_is_a_key_and_value_error_listing_the_presets():
    with pytest.raises(KeyError) as err:  # still a KeyError for lookups, and a ValueError for the CLI
        get_preset("foo")
    assert isinstance(err.value, ValueError) and str(err.value) == "unknown preset 'foo'; known presets: dn-piqa, tiny"


def test_a_newer_checkpoint_format_names_both_versions():
    from piqa_core.checkpoints import parse_meta

    with pytest.raises(CheckpointError, match=r"c.json: written by another piqa version \(format 'piqa-checkpoint/2'; "
                                              r"this piqa reads 'piqa-checkpoint/1'\)"):
        parse_meta('{"format": "piqa-checkpoint/2", "config": {}, "sha256": ""}', "c.json")


def test_swapped_official_files_are_named():
    src = build_bundle("tiny", text_features=False)
    with pytest.raises(CheckpointError, match=r"^LIQE \(a state dict\): not an OpenAI-layout .*did you swap"):
        import_official(openai_layout(src.liqe), official_layout(src.model), config="tiny")
