"""The Ray Train worker loop without a cluster: tiny preset on the CPU, Ray Train's context faked.

Covers what a run only shows in its log or its checkpoints: progress within an epoch, a feature-cache
write that fails (the epoch's checkpoint comes first; the write is best effort), n/a validation lines.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import ray.train
import ray.train.torch
import torch
from PIL import Image

import ray_jobs.train_worker as tw
from piqa_core.config import get_preset
from piqa_core.faces import FaceResult
from piqa_core.features import FeatureCache, image_key
from ray_jobs.storage import S3Options
from ray_jobs.train import TrainJob, prepare_data


def _labels(root: Path, train: int = 5, val: int = 1) -> Path:
    """``train`` + ``val`` 240x240 JPEGs of one group, scored by their index."""
    n = train + val
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (240, 240), (20 * i, 90, 160)).save(buf, "JPEG")
        (root / f"{i}.jpg").write_bytes(buf.getvalue())
    pd.DataFrame({"uri": [f"{i}.jpg" for i in range(n)], "score": np.arange(float(n)), "group": "g",
                  "split": ["train"] * train + ["val"] * val}).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def _job(tmp_path: Path, **kw: Any) -> TrainJob:
    opts = dict(labels=str(_labels(tmp_path, kw.pop("train", 5), kw.pop("val", 1))), run_name="r",
                storage=str(tmp_path), preset="tiny", batch_pairs=2, epochs=1, eval_before=False, lr=1e-4)
    return TrainJob(**{**opts, **kw})


class _MeanScore(torch.nn.Linear):  # an image's score: a linear function of its mean pixel
    def forward(self, whole: torch.Tensor, face: torch.Tensor, aux: Any) -> torch.Tensor:
        return super().forward(whole.mean(dim=(1, 2, 3))[:, None])[:, 0]

    def score_crops(self, whole: torch.Tensor, face: torch.Tensor, aux: Any = None) -> torch.Tensor:
        return self.forward(whole.flatten(0, 1), face.flatten(0, 1), aux).view(whole.shape[:2]).mean(1)


def _env(job: TrainJob, tmp_path: Path, lines: list[str]) -> dict[str, Any]:
    return dict(job=job, cfg=get_preset("tiny"), detector=None, liqe=None, cache=FeatureCache("fp"),
                device=torch.device("cpu"), marker=str(tmp_path / "marker"), log=lines.append)


def test_progress_lines_within_an_epoch_count_steps_and_features(tmp_path: Path, monkeypatch) -> None:
    job = _job(tmp_path)
    _, data = prepare_data(job)
    model, lines = _MeanScore(1, 1), []
    env = _env(job, tmp_path, lines)
    monkeypatch.setattr(tw, "PROGRESS_EVERY_S", 0.0, raising=False)  # a line every step
    out = tw._train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01), data, 0, 0, 1, False, **env)
    steps = [ln for ln in lines if " step " in ln]
    assert len(steps) == 5 and steps[0].startswith("epoch 1/1 step 1/5  running loss ")  # 10 pairs, 2 a step
    assert steps[-1].startswith("epoch 1/1 step 5/5  running loss ")
    assert f"running loss {out['loss_sum'] / out['pairs']:.4f}  " in steps[-1]
    assert " pairs/s  features " in steps[0] and steps[-1].endswith("  features 5/5")  # the 5 train images
    done = [int(ln.rsplit(" ", 1)[1].split("/")[0]) for ln in steps]
    assert done == sorted(done) and done[0] >= 1

    # Features already cached: no features count; validation batches report too.
    lines.clear()
    val = tw._predict_val(model, data["val"], data["keys"]["val"], 0, 1, None, **env)
    assert val is not None and lines == ["validation 1/1 images  features 1/1"]
    lines.clear()
    tw._train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01), data, 1, 0, 1, False, **env)
    assert len(lines) == 5 and not any("features" in ln for ln in lines)


def test_a_step_whose_pairs_all_failed_to_load_leaves_the_weights_alone(tmp_path: Path) -> None:
    job = _job(tmp_path)
    _, data = prepare_data(job)
    for i in range(5):
        (tmp_path / f"{i}.jpg").unlink()  # every training image gone after the listing
    model = _MeanScore(1, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)  # decay alone would move them
    out = tw._train_epoch(model, opt, data, 0, 0, 1, False, **_env(job, tmp_path, []))
    assert out["pairs"] == 0 and out["dropped_pairs"] == 10 and len(out["failed"]) == 5
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_validation_and_features_are_fp32_whatever_the_training_steps_run_in(tmp_path: Path, monkeypatch) -> None:
    """As on a GPU: bf16 autocast steps (CPU autocast here); validation as `piqa eval` scores, at fp32."""
    _Ray(monkeypatch, [])
    monkeypatch.setattr(tw, "_train_bf16", lambda device, precision: True)
    steps, vals = [], []
    loss, predict = tw.pair_loss, tw.predict
    monkeypatch.setattr(tw, "pair_loss", lambda *a: steps.append(a[5]) or loss(*a))  # (…, device, bf16, world)
    monkeypatch.setattr(tw, "predict",
                        lambda *a, **k: vals.append(k.get("bf16", a[4:5] == (True,))) or predict(*a, **k))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default: the detector's convolutions
    job = _job(tmp_path, eval_before=True)
    _, data = prepare_data(job)
    tw.train_loop_per_worker({"job": job, "data": data, "marker": str(tmp_path / "marker"), "attempt": "a1"})
    assert steps == [True] * 5 and vals == [False, False]  # validation before training and after epoch 1
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False


def test_progress_lines_are_rate_limited(tmp_path: Path, monkeypatch) -> None:
    job = _job(tmp_path)
    _, data = prepare_data(job)
    model, lines = _MeanScore(1, 1), []
    # The worker's clock moves 7 s a reading (one at the start, one a step, one more for a line's rate).
    clock = iter(np.arange(0.0, 1000.0, 7.0))
    monkeypatch.setattr(tw, "time", SimpleNamespace(monotonic=lambda: float(next(clock)), sleep=time.sleep,
                                                    perf_counter=time.perf_counter))
    monkeypatch.setattr(tw, "PROGRESS_EVERY_S", 25.0, raising=False)
    tw._train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01), data, 0, 0, 1, False,
                    **_env(job, tmp_path, lines))
    assert [ln.split("  ")[0] for ln in lines] == ["epoch 1/1 step 4/5"]  # at 28 s; step 5 comes 14 s later
    assert lines[0].split("  ")[2] == f"{8 / 35:.1f} pairs/s"  # 4 steps of 2 pairs in 35 s


class _Ray:
    """Ray Train's side of the worker loop, in this process: context, device, DDP wrapper, reports."""

    def __init__(self, monkeypatch, events: list, rank: int = 0, world: int = 1) -> None:
        self.events = events
        ctx = type("Ctx", (), {"get_world_rank": lambda s: rank, "get_world_size": lambda s: world})()
        monkeypatch.setattr(ray.train, "get_context", lambda: ctx)
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
        monkeypatch.setattr(ray.train, "report", self.report)
        monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)

    def report(self, metrics: dict, checkpoint: Any = None, checkpoint_dir_name: str | None = None) -> None:
        files = sorted(os.listdir(checkpoint.path)) if checkpoint is not None else None
        self.events.append(("report", metrics["epoch"], files))


def _run(tmp_path: Path, monkeypatch, fail_write: bool, job: TrainJob | None = None,
         **kw: Any) -> tuple[list, TrainJob]:
    """The worker loop, rank 0 of 1 (``job`` again: the same photos); events: reports and cache writes, in order."""
    job = job or _job(tmp_path, cache=str(tmp_path / "cache"), **kw)
    _, data = prepare_data(job)
    events: list = []
    _Ray(monkeypatch, events)
    write = tw.atomic_write_bytes

    def atomic_write_bytes(uri: str, blob: bytes, s3: Any = None) -> None:
        events.append(("write", os.path.basename(uri)))
        if fail_write:
            raise OSError(28, "No space left on device")
        write(uri, blob, s3)

    monkeypatch.setattr(tw, "atomic_write_bytes", atomic_write_bytes)
    tw.train_loop_per_worker({"job": job, "data": data, "marker": str(tmp_path / "marker"), "attempt": "a1"})
    return events, job


def test_a_failed_cache_write_keeps_the_epochs_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    events, job = _run(tmp_path, monkeypatch, fail_write=True, epochs=2)
    kinds = [e[0] for e in events]
    # Each epoch is reported with its checkpoint; epoch 2 computes no feature but tries the write again.
    assert kinds == ["report", "write", "report", "write"]
    assert events[0][1:] == (0, ["config.json", "history.json", "model.safetensors", "train_state.pt"])
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "warning: feature cache" in ln]
    name = events[1][1]
    assert len(warnings) == 2 and name.startswith("features-")
    assert f"feature cache {tmp_path / 'cache' / name} not written (OSError: [Errno 28] No space left" in warnings[0]
    assert not (tmp_path / "cache" / name).exists()


def test_the_cache_is_written_after_the_epochs_report(tmp_path: Path, monkeypatch, capsys) -> None:
    events, _ = _run(tmp_path, monkeypatch, fail_write=False, epochs=2)
    assert [e[0] for e in events] == ["report", "write", "report"]  # epoch 2: nothing new, nothing written
    back = FeatureCache.read_npz((tmp_path / "cache" / events[1][1]).read_bytes())
    assert len(back["uri"]) == 6 and "feature cache" not in capsys.readouterr().out


def test_a_run_drops_stale_cache_entries_of_its_images(tmp_path: Path, monkeypatch, capsys) -> None:
    events, job = _run(tmp_path, monkeypatch, fail_write=False)
    path = tmp_path / "cache" / events[1][1]
    cols = FeatureCache.read_npz(path.read_bytes())
    current = sorted(cols["uri"])
    uri, size, version = json.loads(current[0])
    stale = [json.dumps([uri, size + 1, version]), uri]  # an earlier upload of a photo, a bare-uri key
    kept = json.dumps(["/elsewhere/x.jpg", 1, "1.0"])  # another run's image
    cols = {k: np.concatenate([v, v[:3]]) for k, v in cols.items()}
    cols["uri"] = np.array([*cols["uri"][:-3], *stale, kept])
    path.write_bytes(_npz(cols))
    capsys.readouterr()
    events, _ = _run(tmp_path, monkeypatch, fail_write=False, job=job)
    # Every feature came from the file, so only the dropped entries make this write.
    assert [e[0] for e in events] == ["report", "write"]
    assert sorted(FeatureCache.read_npz(path.read_bytes())["uri"]) == sorted([*current, kept])
    out = capsys.readouterr().out
    assert f"feature cache: 7 images from {path} (2 stale entries dropped: earlier uploads" in out


def _npz(cols: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, fingerprint=np.array("fp"), **{k: v.astype(str) if k == "uri" else v for k, v in cols.items()})
    return buf.getvalue()


def test_an_image_two_ranks_computed_keeps_the_lowest_ranks_features_on_both(monkeypatch) -> None:
    caches = [FeatureCache(), FeatureCache()]
    for rank, cache in enumerate(caches):  # the same image, one box a rounding apart, plus one of its own
        cache.put("shared", FaceResult((10.0, 10.0, 50.0 + rank * 1e-3, 60.0), 0.9, 1), np.full(3, rank, np.float32))
        cache.put(f"only{rank}", FaceResult(None, 0.0, 0), np.zeros(3, np.float32))
    parts = [c.to_columns() for c in caches]
    monkeypatch.setattr(tw, "all_gather", lambda obj, world, group: parts)
    for cache in caches:
        assert tw._gather_cache(cache, set(), 2, None)
    for cache in caches:
        assert cache.faces["shared"].box == (10.0, 10.0, 50.0, 60.0) and cache.aux["shared"].tolist() == [0, 0, 0]
        assert set(cache.faces) == {"shared", "only0", "only1"}


def test_every_rank_enters_the_same_collectives_when_the_cache_write_fails(tmp_path: Path, monkeypatch) -> None:
    """Two ranks, run one after the other with the collectives recorded (they do not meet): rank 0's
    failing write must not change the order in which it enters them."""
    job = _job(tmp_path, cache=str(tmp_path / "cache"), batch_pairs=2, eval_before=True)
    _, data = prepare_data(job)
    def denied(*args: Any) -> None:
        raise PermissionError("PUT denied")

    monkeypatch.setattr(tw, "atomic_write_bytes", denied)
    monkeypatch.setattr(tw, "object_group", lambda world: None)
    loss = tw.pair_loss
    monkeypatch.setattr(tw, "pair_loss", lambda *a: loss(*a[:-1], 1))  # no all-reduce outside a process group
    seen: dict[int, list] = {}
    for rank in (0, 1):
        events: list = []
        seen[rank] = events

        def gather(obj: Any, world: int, group: Any, events: list = events) -> list:
            events.append(("all_gather", type(obj).__name__))
            return [obj] * world

        monkeypatch.setattr(tw, "all_gather", gather)
        _Ray(monkeypatch, events, rank=rank, world=2)
        tw.train_loop_per_worker({"job": job, "data": data, "marker": str(tmp_path / "marker"), "attempt": "a1"})
    order = [e if e[0] == "all_gather" else e[:2] for e in seen[0]]
    assert order == [e if e[0] == "all_gather" else e[:2] for e in seen[1]]
    assert [e[0] for e in order] == ["all_gather"] * 2 + ["all_gather"] * 3 + ["report"]  # before; epoch 1
    assert order[-1] == ("report", 0)


@pytest.mark.filterwarnings("ignore::piqa_core.metrics.LogisticFitWarning")  # 3 validation images
@pytest.mark.parametrize("val", [1, 3])
def test_the_epoch_line_shows_no_placeholder_metrics(tmp_path: Path, monkeypatch, capsys, val: int) -> None:
    events: list = []
    _Ray(monkeypatch, events)
    job = _job(tmp_path, val=val)
    _, data = prepare_data(job)
    tw.train_loop_per_worker({"job": job, "data": data, "marker": str(tmp_path / "marker"), "attempt": "a1"})
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "] epoch 1/1  loss " in ln)
    if val == 1:  # no group of 3 validation images: SRCC and PLCC are undefined
        assert "val SRCC n/a (no validation group large enough)  lr " in line
        assert "-1.0000" not in line and "PLCC" not in line
    else:
        assert "val SRCC mean " in line and "  PLCC mean " in line


def test_runs_sharing_a_feature_cache_keep_each_others_images(tmp_path: Path) -> None:
    uri = str(tmp_path / "features-fp.npz")
    a, b = image_key("s3://b/a.jpg", 10, '"e1"'), image_key("s3://b/b.jpg", 20, '"e2"')
    first, second = FeatureCache("fp"), FeatureCache("fp")  # two runs that started from the same (empty) file
    first.put(a, FaceResult((1.0, 2.0, 30.5, 40.25), 0.9, 1), np.full(3, 0.5, np.float32))
    second.put(b, FaceResult(None, 0.0, 0), np.zeros(3, np.float32))
    assert tw._save_cache(first, uri, [a], S3Options(), 0, print)
    assert tw._save_cache(second, uri, [b], S3Options(), 0, print)  # the last writer used to drop a.jpg
    back = FeatureCache("fp")
    back.add_columns(FeatureCache.read_npz(Path(uri).read_bytes()))
    assert sorted(back.faces) == [a, b] and back.faces[a].box == (1.0, 2.0, 30.5, 40.25)
    assert back.aux[a].tolist() == [0.5] * 3 and back.faces[b].box is None


def test_a_cache_write_drops_earlier_uploads_of_the_runs_images(tmp_path: Path) -> None:
    uri, face = str(tmp_path / "features-fp.npz"), FaceResult(None, 0.0, 0)
    old, new = image_key("s3://b/a.jpg", 10, '"e1"'), image_key("s3://b/a.jpg", 12, '"e2"')
    other = image_key("s3://b/c.jpg", 30, '"e3"')  # another run's image: kept for it
    theirs = FeatureCache("fp")
    for key in (old, other, "s3://b/a.jpg"):  # the bare uri: a key of older files, which nothing matches
        theirs.put(key, face, np.zeros(3, np.float32))
    assert tw._save_cache(theirs, uri, [old, other], S3Options(), 0, print)
    ours = FeatureCache("fp")
    ours.put(new, face, np.ones(3, np.float32))
    assert tw._save_cache(ours, uri, [new], S3Options(), 0, print)
    assert sorted(FeatureCache.read_npz(Path(uri).read_bytes())["uri"]) == sorted([new, other])
    assert sorted(ours.faces) == sorted([new, other])


def test_a_diverged_loss_ends_the_loop_and_says_so_in_a_file(tmp_path: Path, monkeypatch) -> None:
    events, job = _run(tmp_path, monkeypatch, fail_write=False, lr=1e30, epochs=3, train=6)
    assert events == [("write", "diverged.json")]  # no checkpoint reported, no exception for Ray to retry
    said = json.loads((tmp_path / "r" / "diverged.json").read_text())
    assert said["attempt"] == "a1" and said["epoch"] == 0
    assert re.match(r"epoch 1, step \d+: the training loss is (nan|inf)", said["error"])


def test_a_diverged_loss_whose_file_cannot_be_written_still_raises_the_divergence(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FloatingPointError, match=r"the training loss is (nan|inf)") as raised:
        _run(tmp_path, monkeypatch, fail_write=True, lr=1e30, epochs=3, train=6)
    assert isinstance(raised.value.__cause__, OSError)  # Ray retries it then, and the driver still says diverged


def test_training_steps_take_bf16_on_gpus_unless_fp32_is_asked() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert tw._train_bf16(cuda, "bf16") and not tw._train_bf16(cuda, "fp32")
    assert not tw._train_bf16(cpu, "bf16") and not tw._train_bf16(cpu, "fp32")
    assert TrainJob("l.csv", "r", "/s").precision == "bf16"


def test_the_workers_take_the_jobs_precision(tmp_path: Path, monkeypatch) -> None:
    asked = []
    monkeypatch.setattr(tw, "_train_bf16", lambda device, precision: asked.append(precision) or False)
    _run(tmp_path, monkeypatch, fail_write=False, precision="fp32")
    assert asked == ["fp32"]
