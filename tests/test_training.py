"""Training helpers: the feature cache (exact boxes, keyed by upload), validation and epoch summaries."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from piqa_core.config import get_preset
from piqa_core.faces import FaceResult, face_crop_box
from piqa_core.features import FeatureCache, fill_cache, image_key, prepare_items
from piqa_core.training import (batch_failures, check_loss, epoch_pairs, format_val_srcc, rank_batch, shard,
                                train_metrics, val_metrics)

# float32 moves this coordinate from just above .5 to exactly .5, where round() goes to even instead:
# round(x - 20) is 1069 in float64 and 1068 after a float32 round trip.
BOX = (1088.5000568190756, 40.25, 1300.75, 260.5)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((1400, 1000)).save(buf, "JPEG")
    return buf.getvalue()


class _FixedDetector:
    """Stands in for RetinaFace: one face at BOX in every image."""

    def detect_each(self, inputs, sizes):
        return [FaceResult(BOX, 0.93, 1) for _ in inputs]


def test_fill_cache_keeps_the_detected_box_exactly() -> None:
    assert round(np.float32(BOX[0]) - 20) != round(BOX[0] - 20)  # the case is a real one
    cache = FeatureCache("fp")
    fill_cache([_jpeg()], ["a.jpg"], get_preset("tiny"), _FixedDetector(), None, cache, torch.device("cpu"))
    assert cache.faces["a.jpg"].box == BOX
    assert face_crop_box(cache.faces["a.jpg"], 20)[0] == 1069


def test_cache_file_round_trip_keeps_boxes_exactly() -> None:
    cache = FeatureCache("fp")
    cache.put("a.jpg", FaceResult(BOX, 0.93, 2), np.arange(4, dtype=np.float32))
    cache.put("b.jpg", FaceResult(None, 0.0, 0), np.ones(4, np.float32))
    back = FeatureCache("fp")
    back.add_columns(FeatureCache.read_npz(cache.to_npz()))
    assert back.faces["a.jpg"].box == BOX and back.faces["a.jpg"].n_faces == 2
    assert back.faces["b.jpg"].box is None
    np.testing.assert_array_equal(back.aux["a.jpg"], np.arange(4))


class _SizeDetector:
    """One face whose box is the image's top-left quarter; counts the images it was asked about."""

    def __init__(self) -> None:
        self.seen = 0

    def detect_each(self, inputs, sizes):
        self.seen += len(inputs)
        return [FaceResult((0.0, 0.0, w / 2, h / 2), 0.9, 1) for w, h in sizes]


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 40, 200)).save(buf, "PNG")
    return buf.getvalue()


def test_an_upload_under_a_known_uri_misses_the_cache() -> None:
    cfg, cpu, det, cache = get_preset("tiny"), torch.device("cpu"), _SizeDetector(), FeatureCache("fp")
    first, second = _png((240, 240)), _png((320, 240))
    old_key = image_key("s3://b/a.png", len(first), '"etag1"')
    new_key = image_key("s3://b/a.png", len(second), '"etag2"')
    prepare_items([first], [old_key], cfg, det, None, cache, "center", [None], cpu)
    prepare_items([first], [old_key], cfg, det, None, cache, "center", [None], cpu)
    assert det.seen == 1  # the second call took the face from the cache
    prepare_items([second], [new_key], cfg, det, None, cache, "center", [None], cpu)
    assert det.seen == 2 and cache.faces[new_key].box == (0.0, 0.0, 160.0, 120.0)
    assert cache.faces[old_key].box == (0.0, 0.0, 120.0, 120.0)
    # a cache file written before the keys (bare uris) loads, and its entries match nothing
    legacy = FeatureCache("fp")
    legacy.put("s3://b/a.png", FaceResult((1.0, 1.0, 9.0, 9.0), 0.9, 1), None)
    back = FeatureCache("fp")
    back.add_columns(FeatureCache.read_npz(legacy.to_npz()))
    prepare_items([second], [new_key], cfg, det, None, back, "center", [None], cpu)
    assert det.seen == 3 and back.faces[new_key].box == (0.0, 0.0, 160.0, 120.0)


def test_cached_faces_skip_the_detectors_copy_of_the_photo(monkeypatch) -> None:
    import piqa_core.stages

    cfg, cpu, det, cache = get_preset("tiny"), torch.device("cpu"), _SizeDetector(), FeatureCache("fp")
    key, png = image_key("s3://b/a.png", 1, '"e"'), _png((320, 240))
    first = prepare_items([png], [key], cfg, det, None, cache, "random", [np.random.default_rng(0)], cpu)
    monkeypatch.setattr(piqa_core.stages, "detector_input", lambda *a: pytest.fail("resized for no detector"))
    again = prepare_items([png], [key], cfg, det, None, cache, "random", [np.random.default_rng(0)], cpu)
    assert det.seen == 1 and again["status"].tolist() == ["ok"] and again["face_found"].tolist() == [True]
    for k in ("whole", "face", "face_box"):
        np.testing.assert_array_equal(again[k], first[k])


def test_the_cache_fingerprint_names_the_weights_and_how_features_were_computed(monkeypatch) -> None:
    from piqa_core import features
    from piqa_core.checkpoints import build_bundle

    bundle = build_bundle("tiny", seed=1)
    first = features.fingerprint(bundle)
    assert features.fingerprint(build_bundle("tiny", seed=1)) == first
    assert features.fingerprint(build_bundle("tiny", seed=2)) != first  # other frozen weights
    # a file computed another way (TF32 features of version 1) is another file, never reused
    monkeypatch.setattr(features, "FEATURES_VERSION", features.FEATURES_VERSION - 1)
    assert features.fingerprint(bundle) != first


def test_drop_stale_keeps_other_images_and_the_current_upload() -> None:
    cache, face = FeatureCache("fp"), FaceResult(None, 0.0, 0)
    old, new = image_key("s3://b/a.png", 10, '"e1"'), image_key("s3://b/a.png", 10, '"e2"')
    other, mtime = image_key("s3://b/c.png", 10, '"e1"'), image_key("/data/a.png", 10, "1764000000.0")
    for key in (old, new, other, mtime, "s3://b/a.png", "7"):
        cache.put(key, face, None)
    assert cache.drop_stale([new, mtime]) == 3  # the old upload and the two keys that are no image_key
    assert sorted(cache.faces) == sorted([new, other, mtime]) and sorted(cache.aux) == sorted(cache.faces)
    assert cache.drop_stale([new, mtime]) == 0


def test_validation_counts_nonfinite_scores_apart_from_failed_images() -> None:
    pred = np.array([0.1, 0.2, 0.3, 0.4, np.nan, np.nan, np.inf])
    loaded = np.array([True, True, True, True, False, True, True])
    m = val_metrics(pred, np.arange(7.0), ["g"] * 7, loaded)
    assert (m["val_items"], m["val_failed"], m["val_nonfinite"]) == (4, 1, 2)
    assert m["val_srcc_median"] == pytest.approx(1.0) and m["val_valid_groups"] == 1
    assert m["val_srcc_mean"] == -1.0  # ranks below any sound epoch
    assert format_val_srcc(m) == "n/a (the model scored 2 validation image(s) nan or inf)"
    clean = val_metrics(pred, np.arange(7.0), ["g"] * 7, loaded & np.isfinite(pred))  # the same, failing to load
    assert clean["val_srcc_mean"] == pytest.approx(1.0) and clean["val_nonfinite"] == 0


def test_checkpoints_rank_on_the_same_groups_every_epoch() -> None:
    labels, groups, loaded = np.arange(10.0), ["a"] * 5 + ["b"] * 5, np.ones(10, bool)
    sound = np.array([0, 1, 2, 4, 3, 1, 0, 2, 4, 3], float)  # SRCC 0.9 and 0.8
    collapsed = np.concatenate([sound[:5], np.ones(5)])  # group b scored constant: its SRCC is undefined
    diverged = np.concatenate([sound[:5], np.full(5, np.nan)])
    ranks = {k: val_metrics(p, labels, groups, loaded)["val_srcc_mean"]
             for k, p in (("sound", sound), ("collapsed", collapsed), ("diverged", diverged))}
    assert ranks == {"sound": pytest.approx(0.85), "collapsed": pytest.approx(0.45), "diverged": -1.0}
    few = loaded.copy()
    few[5:8] = False  # b keeps 2 loaded images this epoch: no SRCC, so 0, not left out (0.9 alone would win)
    assert val_metrics(sound, labels, groups, few)["val_srcc_mean"] == pytest.approx(0.45)
    assert val_metrics(sound, np.r_[labels[:5], np.ones(5)], groups, loaded)["val_srcc_mean"] == pytest.approx(0.9)
    flat = val_metrics(np.ones(10), labels, groups, loaded)  # a collapsed model: ranked 0, said so
    assert (flat["val_srcc_mean"], flat["val_ranked_groups"], flat["val_valid_groups"]) == (0.0, 2, 0)
    assert format_val_srcc(flat).startswith("0 (the model scored every validation group constant")
    small = val_metrics(sound[:4], labels[:4], ["a", "a", "b", "b"], loaded[:4])
    assert small["val_srcc_mean"] == -1.0 and format_val_srcc(small) == "n/a (no validation group large enough)"


def test_a_nonfinite_training_loss_stops_the_epoch() -> None:
    assert check_loss(0.25, 0, 0) == 0.25
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match=rf"epoch 3, step 8: the training loss is {bad}, the model "
                                                     r"diverged \(a rerun repeats it\): start a new run with a lower"):
            check_loss(bad, 2, 7)


def test_failed_training_images_are_counted_once_across_ranks() -> None:
    # a batch of 3 pairs: images (4, 7), (5, 4), (6, 8); image 4 failed to decode
    idx = np.array([4, 5, 6, 7, 4, 8])
    status = np.array(["ok", "ok", "ok", "ok", "error", "ok"], dtype=object)
    code = np.array(["", "", "", "", "truncated", ""], dtype=object)
    cols = {"status": status, "error_code": code, "error_message": np.where(status == "ok", "", "cut short")}
    uris = [f"img{i}.jpg" for i in range(10)]
    failed, dropped = batch_failures(cols, idx, uris)
    assert failed == {4: "img4.jpg: truncated: cut short"} and dropped == 1
    ranks = [{"loss_sum": 1.0, "pairs": 2, "dropped_pairs": 1, "failed": failed},
             {"loss_sum": 2.0, "pairs": 2, "dropped_pairs": 2, "failed": {4: failed[4], 9: "img9.jpg: not_found: x"}}]
    metrics, messages = train_metrics(ranks, seconds=2.0)
    assert metrics == {"train_loss": 0.75, "pairs": 4, "pairs_per_s": 2.0, "train_failed_images": 2,
                       "train_dropped_pairs": 3}
    assert messages == ["img4.jpg: truncated: cut short", "img9.jpg: not_found: x"]


def test_a_step_covers_the_same_pairs_whatever_the_worker_count() -> None:
    pairs = np.arange(2 * 37).reshape(37, 2)  # pair p = (2p, 2p + 1)
    single = [pairs[s * 6:(s + 1) * 6] for s in range(36 // 6)]
    for world in (1, 2, 3, 6):
        b = rank_batch(6, world)
        shards = [shard(pairs, r, world)[1] for r in range(world)]
        steps = [np.concatenate([m[s * b:(s + 1) * b] for m in shards]) for s in range(len(shards[0]) // b)]
        assert [sorted(map(tuple, x)) for x in steps] == [sorted(map(tuple, x)) for x in single], world
    with pytest.raises(ValueError, match="--batch-pairs 6 does not split evenly over 4 workers: use a multiple of 4"):
        rank_batch(6, 4)


def test_seeds_do_not_replay_each_other_one_epoch_apart() -> None:
    groups = [g for g in range(20) for _ in range(5)]
    assert not np.array_equal(epoch_pairs(groups, 1, seed=0), epoch_pairs(groups, 0, seed=1))
    assert np.array_equal(epoch_pairs(groups, 3, seed=7), epoch_pairs(groups, 3, seed=7))  # a resumed epoch replays


def test_each_image_gets_its_partners_within_its_group_every_epoch() -> None:
    groups = ["a"] * 4 + ["b"] * 3 + ["c"]  # c alone: no partner
    for per_image in (1, 2):
        pairs = epoch_pairs(groups, 0, seed=3, per_image=per_image)
        assert sorted(np.bincount(pairs[:, 0], minlength=8).tolist()) == [0] + [per_image] * 7
        assert all(groups[i] == groups[j] and i != j for i, j in pairs)


class _MeanScore(torch.nn.Module):
    """score = a·mean(whole) + b·mean(face): cheap, and each pair moves the gradient differently."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.7, -0.3]))

    def forward(self, whole: torch.Tensor, face: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return self.w[0] * whole.mean((1, 2, 3)) + self.w[1] * face.mean((1, 2, 3))


def _pair_batch(seed: int, failed: tuple[int, ...] = ()) -> tuple[dict, np.ndarray]:
    """Two pairs (rows 0-1 first images, 2-3 partners); ``failed`` rows did not load."""
    rng = np.random.default_rng(seed)
    status = np.array(["ok"] * 4, dtype=object)
    status[list(failed)] = "error"
    cols = {"whole": rng.integers(0, 256, (4, 1, 4, 4, 3), dtype=np.uint8),
            "face": rng.integers(0, 256, (4, 1, 4, 4, 3), dtype=np.uint8),
            "aux": rng.normal(size=(4, 495)).astype(np.float32), "status": status}
    return cols, rng.normal(size=4).astype(np.float32)


_RANK_BATCHES = [(0, ()), (1, (3,))]  # rank 1's second pair lost its partner image


def _ddp_step(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from piqa_core.training import pair_loss

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_MeanScore())
        cols, labels = _pair_batch(*_RANK_BATCHES[rank])
        loss, total, n, n_all = pair_loss(model, cols, labels, get_preset("tiny"), torch.device("cpu"), world=world)
        loss.backward()
        labels[0] = np.nan if rank == 1 else labels[0]  # one rank diverges: both must see it
        diverged = pair_loss(model, cols, labels, get_preset("tiny"), torch.device("cpu"), world=world)[1]
        torch.save({"grad": model.module.w.grad, "diverged": diverged, "n_all": n_all}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_pair_loss_over_ranks_is_the_mean_over_all_valid_pairs(tmp_path) -> None:
    """Ranks that lost different numbers of pairs: the DDP step equals one step on all valid pairs."""
    from piqa_core.training import pair_loss

    batches = [_pair_batch(*b) for b in _RANK_BATCHES]
    first = lambda k: np.concatenate([b[0][k][:2] for b in batches])  # noqa: E731
    second = lambda k: np.concatenate([b[0][k][2:] for b in batches])  # noqa: E731
    joined = {k: np.concatenate([first(k), second(k)]) for k in batches[0][0]}
    labels = np.concatenate([np.concatenate([b[1][:2] for b in batches]),
                             np.concatenate([b[1][2:] for b in batches])])
    model = _MeanScore()
    loss, total, n, n_all = pair_loss(model, joined, labels, get_preset("tiny"), torch.device("cpu"))
    assert n == n_all == 3 and loss.item() == pytest.approx(total / 3)
    loss.backward()

    torch.multiprocessing.spawn(_ddp_step, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path / "grad.pt")),
                                nprocs=2)
    ranks = [torch.load(tmp_path / f"grad.pt.{rank}") for rank in (0, 1)]
    torch.testing.assert_close(ranks[0]["grad"], model.w.grad)
    assert all(np.isnan(r["diverged"]) for r in ranks) and [r["n_all"] for r in ranks] == [3, 3]


def test_an_unreadable_remote_start_file_is_named_by_its_option(tmp_path) -> None:
    from piqa_core.checkpoints import CheckpointError
    from piqa_core.training import init_bundle

    with pytest.raises(CheckpointError, match=r"^--init-face \(remote file\): not a readable torch checkpoint"):
        init_bundle("tiny", init_face=b"PK\x03\x04 truncated download")
    (tmp_path / "LIQE.pt").write_bytes(b"not torch")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'LIQE.pt'}: not a readable"):
        init_bundle("tiny", liqe=str(tmp_path / "LIQE.pt"))
