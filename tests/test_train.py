"""Retraining on Ray Train (tiny preset, CPU): a real learning task, failure recovery, S3, resume, eval.

The learning task: skimage photos, each one group (scene), degraded along a ladder of five levels;
level L applies Gaussian blur, Gaussian noise, JPEG and over-exposure, all at strength L (0 = pristine),
to three slightly different framings of the photo; label = 4 - L. Validation = 35 % of every group.

Measured (tiny preset, 2 CPU workers, lr 3e-4; validation per-group SRCC, mean over 12 groups):

    seed   untrained   1 epoch   gap     2 epochs
    0      -0.722      0.911     1.633   0.928
    1      -0.635      0.870     1.505   0.865
    2      +0.445      0.753     0.308   0.739
    3      -0.143      0.815     0.958   0.879

Random networks already rank the ladder strongly, with a random sign. The test trains one epoch
(the second adds little) with seed 2, the positive baseline and smallest gap, and asserts half that gap.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFilter
from skimage import data as skdata

from piqa_core.checkpoints import build_bundle, load_checkpoint, save_checkpoint
from piqa_core.config import get_preset
from piqa_core.features import FeatureCache
from piqa_core.training import epoch_pairs, format_val_srcc, init_bundle, train_metrics
import ray_jobs.train
from ray_jobs.actors import weights_dir
from ray_jobs.cli import main
from ray_jobs.listing import list_images
from ray_jobs.storage import read_bytes
from ray_jobs.labels import LabelError
from ray_jobs.train import TrainJob, TrainSetupError, has_checkpoint, prepare_data, run_train_job
from ray_jobs.train_worker import _train_epoch
from tests.test_checkpoints import official_layout, openai_layout, to_timm067_swin


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "motorcycle", "camera", "coins", "moon", "clock")
BLUR, NOISE, JPEG, EXPOSURE = (2.0, 4.0, 7.0, 12.0), (25.0, 50.0, 80.0, 120.0), (12, 6, 3, 1), (1.6, 2.4, 3.4, 5.0)
SEED, MIN_GAP = 2, 0.308  # the smallest measured gap (see the table above)


def photo(name: str, short_side: int = 224) -> Image.Image:
    arr = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
    img = Image.fromarray(arr if arr.ndim == 2 else arr[..., :3]).convert("RGB")
    s = short_side / min(img.size)
    return img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.BILINEAR)


def degrade(img: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """Blur, noise, JPEG and over-exposure at ``level`` (1..4) each; level 0 returns ``img``."""
    if level == 0:
        return img
    i = level - 1
    img = img.filter(ImageFilter.GaussianBlur(BLUR[i]))
    arr = np.asarray(img, np.float32) + rng.normal(0, NOISE[i], (img.size[1], img.size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=JPEG[i])
    arr = np.asarray(Image.open(buf).convert("RGB"), np.float32) * EXPOSURE[i]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_ladder(root: Path, photos: tuple[str, ...] = PHOTOS, framings: int = 3, seed: int = 0) -> Path:
    """PNGs under ``root/images/<photo>/`` and ``root/labels.csv`` (relative uri, score, group)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in photos:
        base = photo(name)
        w, h = base.size
        cw, ch = int(w * 0.9), int(h * 0.9)
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for v, (ox, oy) in enumerate([(0, 0), (w - cw, h - ch), (w - cw, 0)][:framings]):
            framed = base.crop((ox, oy, ox + cw, oy + ch)).resize(base.size, Image.BILINEAR)
            for level in range(5):
                rel = f"images/{name}/l{level}v{v}.png"
                degrade(framed, level, rng).save(root / rel, compress_level=1)
                rows.append({"uri": rel, "score": float(4 - level), "group": name})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ladder(tmp_path_factory.mktemp("ladder"))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two groups of ten images: for the behaviour tests, where learning is not the point."""
    return make_ladder(tmp_path_factory.mktemp("small"), photos=("astronaut", "coffee"), framings=2)


@pytest.fixture(scope="module")
def learned(ray_local, ladder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    storage = tmp_path_factory.mktemp("runs")
    job = TrainJob(labels=str(ladder), run_name="ladder", storage=str(storage), workers=2, epochs=1, lr=3e-4,
                   preset="tiny", val_fraction=0.35, seed=SEED, keep=1)
    return run_train_job(job)


@pytest.mark.ray
@pytest.mark.slow
def test_training_beats_the_untrained_model(learned: dict) -> None:
    before = learned["val_before"]["val_srcc_mean"]
    after = learned["history"][-1]["val_srcc_mean"]
    assert learned["val_before"]["val_valid_groups"] == 12 and learned["history"][-1]["val_items"] == 60
    assert after - before >= MIN_GAP / 2, (before, after)
    assert learned["history"][-1]["pairs"] == 240  # each train image twice as the first of a pair

    bundle = load_checkpoint(learned["model_dir"])  # the exported best checkpoint is a model directory
    assert bundle.model_id == "ladder" and not bundle.random_init and bundle.config.preset == "tiny"
    assert bundle.random_parts == ("liqe", "face")  # trained without --liqe/--retinaface
    assert bundle.meta["train"]["epochs_completed"] == 1 and bundle.meta["train"]["init"]["preset"] == "tiny"
    assert not (Path(learned["model_dir"]) / "train_state.pt").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_eval_cli_on_the_exported_model(learned: dict, small: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    r = CliRunner().invoke(main, ["eval", "--labels", str(small), "--val-fraction", "0.35", "--split", "val",
                                  "--seed", str(SEED), "--weights", learned["model_dir"], "--out", str(out),
                                  "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    assert "model ladder" in r.output and "astronaut" in r.output and "median" in r.output
    assert "trained with random liqe+face" in r.output
    report = json.loads(out.read_text())
    assert report["random_weights"] is False and report["random_parts"] == ["liqe", "face"]
    assert report["split"] == "val" and report["items"] == 8 and report["failed"] == 0
    assert [g["group"] for g in report["per_group"]] == ["astronaut", "coffee"]
    assert report["mean"]["valid_groups"] == 2 and -1 <= report["mean"]["srcc"] <= 1
    preds = pd.read_parquet(tmp_path / "report.parquet")
    assert len(preds) == 8 and preds["status"].eq("ok").all() and preds["score"].notna().all()


@pytest.mark.ray
@pytest.mark.slow
def test_worker_failure_resumes_from_the_last_checkpoint(ray_local, small: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the crash marker lands here, not in /tmp
    labels = pd.read_csv(small)
    labels["split"] = np.where(labels["uri"].str.contains("v1"), "test", "train")  # one framing is test
    labels.to_csv(small.parent / "with_test.csv", index=False)
    job = TrainJob(labels=str(small.parent / "with_test.csv"), run_name="chaos", storage=str(tmp_path), workers=1,
                   epochs=3, lr=3e-4, lr_step=2, preset="tiny", val_fraction=0.35, max_failures=1, keep=3,
                   fail_at_epoch=1, eval_before=False)
    summary = run_train_job(job)  # rank 0 dies during epoch 2; FailureConfig(max_failures=1) restarts it
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # epoch 2 ran in a new worker group that resumed after epoch 1 instead of starting over
    assert [h["session_start_epoch"] for h in history] == [0, 1, 1]
    # the optimiser and StepLR(2, 0.9) states came back with the weights: the decay kept its step count
    assert [h["lr"] for h in history] == pytest.approx([3e-4, 3e-4, 2.7e-4])
    assert sorted(p.name for p in tmp_path.joinpath("chaos").glob("epoch_*")) == [f"epoch_000{i}" for i in range(3)]
    # the test split is scored once, at the end, with the best-by-validation model
    assert summary["test"]["items"] == 10 and summary["test"]["failed"] == 0
    assert summary["test"]["model_sha256"] == load_checkpoint(tmp_path / "chaos" / "model").sha256
    report = json.loads((tmp_path / "chaos" / "test_report.json").read_text())
    assert report["model_id"] == "chaos" and report["split"] == "test" and report["mean"]["valid_groups"] == 2
    assert len(pd.read_parquet(tmp_path / "chaos" / "test_report.parquet")) == 10

    def dies(*args):
        raise RuntimeError("the driver died while testing")

    monkeypatch.setattr(ray_jobs.train, "_evaluate_test", dies)
    with pytest.raises(RuntimeError, match="died while testing"):
        run_train_job(replace(job, epochs=4, fail_at_epoch=None))  # more epochs: a new best may be exported
    left = json.loads((tmp_path / "chaos" / "summary.json").read_text())
    assert left["epochs_completed"] == 4 and left["test"] == "pending"  # not the first invocation's summary


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_without_validation_exports_its_last_epoch(ray_local, small: Path, tmp_path: Path) -> None:
    job = TrainJob(labels=str(small), run_name="noval", storage=str(tmp_path), epochs=3, lr=3e-4, preset="tiny",
                   val_fraction=0, eval_before=False, keep=1)  # as when replaying a fixed pair list over all images
    (tmp_path / "noval").mkdir()
    # an earlier attempt's divergence, before any epoch this run now has (-1: none), is not this one's
    (tmp_path / "noval" / "diverged.json").write_text('{"attempt": "an earlier one", "epoch": -1, "error": "nan"}')
    summary = run_train_job(job)
    assert [h["val_items"] for h in summary["history"]] == [0, 0, 0] and summary["best_epoch"] == 2
    # every epoch ties at -1: the one checkpoint kept (--keep 1) and exported is the last, not the first
    assert sorted(p.name for p in (tmp_path / "noval").glob("epoch_*")) == ["epoch_0002"]
    assert load_checkpoint(tmp_path / "noval" / "model").sha256 == \
        load_checkpoint(tmp_path / "noval" / "epoch_0002").sha256


@pytest.mark.ray
@pytest.mark.slow
def test_s3_checkpoints_and_rerunning_the_same_command_resumes(ray_local, s3_server, s3_bucket: str, small: Path,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the crash marker lands here, not in /tmp
    storage, cache = f"s3://{s3_bucket}/runs", f"s3://{s3_bucket}/cache"
    argv = ["train", "--labels", str(small), "--run-name", "s3run", "--storage", storage, "--cache", cache,
            "--endpoint-url", s3_server.endpoint_url, "--workers", "1", "--epochs", "2", "--preset", "tiny",
            "--lr", "3e-4", "--val-fraction", "0.35", "--max-failures", "0", "--fail-at-epoch", "1"]
    first = CliRunner().invoke(main, argv)  # dies at the start of epoch 2, after checkpointing epoch 1
    assert first.exit_code == 1 and "Re-run the same command to resume" in first.output, first.output
    opts = s3_server.options
    keys = {o.uri.removeprefix(f"s3://{s3_bucket}/") for o in list_images(f"s3://{s3_bucket}", opts, extensions=None)}
    assert {"runs/s3run/epoch_0000/model.safetensors", "runs/s3run/epoch_0000/train_state.pt"} <= keys
    assert any(k.startswith("cache/features-") and k.endswith(".npz") for k in keys)

    second = CliRunner().invoke(main, argv)  # the same command again
    assert second.exit_code == 0, second.output
    summary = json.loads(read_bytes(f"{storage}/s3run/summary.json", opts))
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1] and history[1]["session_start_epoch"] == 1
    assert history[0]["features_loaded"] == 0 and history[1]["features_loaded"] == 20  # cache read back
    assert summary["val_before"] is not None  # from the first attempt, carried in the checkpoint
    model = load_checkpoint(weights_dir(f"{storage}/s3run/model", opts))
    assert model.model_id == "s3run" and model.meta["train"]["epochs_completed"] == summary["best_epoch"] + 1


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_start_weights_from_each_kind_of_source(tmp_path: Path) -> None:
    src = build_bundle("tiny", seed=5)
    save_checkpoint(src, tmp_path / "ours")
    bundle, warnings = init_bundle("tiny", init=str(tmp_path / "ours"))  # our model directory: everything
    assert _same(bundle.model, src.model) and _same(bundle.liqe, src.liqe)
    # ... but that one is random: once trained, its frozen networks still are
    assert bundle.random_parts == ("liqe", "face") and len(warnings) == 2
    bundle.random_init, bundle.random_parts = False, ()
    save_checkpoint(bundle, tmp_path / "real")
    bundle, warnings = init_bundle("tiny", init=str(tmp_path / "real"))
    assert not warnings and bundle.random_parts == ()
    with pytest.raises(ValueError, match="already holds LIQE"):
        init_bundle("tiny", init=str(tmp_path / "ours"), liqe=str(tmp_path / "LIQE.pt"))

    torch.save(official_layout(src.model), tmp_path / "PIQ_model.pth")  # timm 0.6.7 layout
    torch.save(openai_layout(src.liqe), tmp_path / "LIQE.pt")
    bundle, warnings = init_bundle("tiny", init=str(tmp_path / "PIQ_model.pth"), liqe=str(tmp_path / "LIQE.pt"))
    assert _same(bundle.model, src.model) and bundle.liqe.text_features.abs().sum() > 0
    assert warnings == ["RetinaFace weights are random (frozen during training)"] and bundle.random_parts == ("face",)

    lsvq = {f"feature_extraction.{k}": v for k, v in to_timm067_swin(src.model.backbone).items()}
    gfiqa = {f"feature_extraction.feature_extraction.{k}": v
             for k, v in to_timm067_swin(src.model.backbone_face).items()}
    torch.save(lsvq, tmp_path / "lsvq.pth")
    buf = io.BytesIO()
    torch.save(gfiqa, buf)  # remote files arrive as bytes
    bundle, warnings = init_bundle("tiny", seed=0, init_whole=str(tmp_path / "lsvq.pth"), init_face=buf.getvalue())
    assert _same(bundle.model.backbone, src.model.backbone)
    assert _same(bundle.model.backbone_face, src.model.backbone_face)
    assert _same(bundle.model.head, build_bundle("tiny", seed=0).model.head)  # the head stays random (seed 0)
    assert len(warnings) == 2
    # PIQ_model.pth as both backbone files: each branch gets its own (the face one took the whole's)
    bundle, _ = init_bundle("tiny", seed=0, init_whole=str(tmp_path / "PIQ_model.pth"),
                            init_face=str(tmp_path / "PIQ_model.pth"))
    assert _same(bundle.model.backbone, src.model.backbone)
    assert _same(bundle.model.backbone_face, src.model.backbone_face)


# ----------------------------------------------------------------------- refused before any worker starts


@pytest.mark.ray
def test_damaged_start_weights_fail_once_before_the_trainer(ray_local, small: Path, tmp_path: Path) -> None:
    (tmp_path / "LSVQ.pth").write_text("not a checkpoint")
    job = TrainJob(labels=str(small), run_name="r", storage=str(tmp_path / "runs"), preset="tiny",
                   val_fraction=0.35, init_whole=str(tmp_path / "LSVQ.pth"))
    with pytest.raises(TrainSetupError, match=r"the start weights cannot be loaded: .*LSVQ.pth: not a readable"):
        run_train_job(job)  # a worker failure (retried max_failures times) before
    assert not has_checkpoint(job)


@pytest.mark.ray
@pytest.mark.slow
def test_a_diverged_run_fails_once_without_retries(ray_local, small: Path, tmp_path: Path) -> None:
    job = TrainJob(labels=str(small), run_name="div", storage=str(tmp_path), epochs=2, lr=1e30, preset="tiny",
                   val_fraction=0, eval_before=False, max_failures=2)
    with pytest.raises(FloatingPointError, match=r"epoch 1, step \d+: the training loss is (nan|inf), the model"):
        run_train_job(job)  # a worker failure before, replayed --max-failures times
    assert not has_checkpoint(job) and not (tmp_path / "div" / "model").exists()
    with pytest.raises(TrainSetupError, match=r"run div diverged \(epoch 1, step \d+: .*resuming it would diverge"):
        run_train_job(job)  # the same command again (a RayJob's retry): refused before any worker starts


def test_validation_without_a_rankable_group_is_said_not_shown_as_minus_one(tmp_path: Path, capsys) -> None:
    rows = [{"uri": f"images/g{g}/{i}.png", "score": float(i), "group": f"g{g}"} for g in range(3) for i in range(6)]
    for r in rows:
        (tmp_path / r["uri"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (240, 240), (40 * int(r["score"]), 90, 90)).save(tmp_path / r["uri"])
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    prepare_data(TrainJob(labels=str(tmp_path / "labels.csv"), run_name="r", storage=str(tmp_path), val_fraction=0.2))
    assert "no validation group has 3 images" in capsys.readouterr().err  # 6 per group -> 1-2 held out
    frame = pd.DataFrame(rows)
    frame["split"] = np.where(frame.index % 6 == 0, "train", "val")  # one train image per group: no pair
    frame.to_csv(tmp_path / "singletons.csv", index=False)
    with pytest.raises(LabelError, match="no group has 2 train images"):
        prepare_data(TrainJob(labels=str(tmp_path / "singletons.csv"), run_name="r", storage=str(tmp_path)))
    with pytest.raises(LabelError, match=r"an epoch has 30 pair\(s\), fewer than --workers 32"):
        prepare_data(TrainJob(labels=str(tmp_path / "labels.csv"), run_name="r", storage=str(tmp_path), workers=32,
                              batch_pairs=32, val_fraction=0.2))  # 3 groups x 5 train images x 2 partners
    pairs_of_two = frame[frame.index % 6 < 2].drop(columns="split")  # a hold-out leaves 2 train images a group
    pairs_of_two.to_csv(tmp_path / "twos.csv", index=False)
    with pytest.raises(LabelError, match=r"no validation images: --val-fraction 0.2 holds none out of groups"):
        prepare_data(TrainJob(labels=str(tmp_path / "twos.csv"), run_name="r", storage=str(tmp_path)))
    frame = frame.drop(index=range(1, 6)).assign(split="train")  # g0 keeps one image, alone; no validation
    frame.to_csv(tmp_path / "no_val.csv", index=False)
    prepare_data(TrainJob(labels=str(tmp_path / "no_val.csv"), run_name="r", storage=str(tmp_path), val_fraction=0))
    err = capsys.readouterr().err
    assert "1 train image(s) are alone in their group" in err and "no validation images" in err
    assert format_val_srcc({"val_srcc_mean": -1.0, "val_srcc_median": -1.0, "val_valid_groups": 0}).startswith("n/a")
    assert format_val_srcc({"val_srcc_mean": 0.5, "val_srcc_median": 0.25, "val_valid_groups": 2}) == \
        "mean 0.5000 median 0.2500"


def _photos(root: Path, broken: int | None = None) -> Path:
    """Six JPEGs of one group (the last one validation) and their labels; ``broken`` is cut short."""
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (240, 240), (30 * i, 90, 160)).save(buf, "JPEG")
        data = buf.getvalue()
        (root / f"{i}.jpg").write_bytes(data[:len(data) // 2] if i == broken else data)
    pd.DataFrame({"uri": [f"{i}.jpg" for i in range(6)], "score": np.arange(6.0), "group": "g",
                  "split": ["train"] * 5 + ["val"]}).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


class _MeanScore(torch.nn.Linear):  # an image's score: a linear function of its mean pixel
    def forward(self, whole, face, aux):
        return super().forward(whole.mean(dim=(1, 2, 3))[:, None])[:, 0]


def _epoch(tmp_path: Path, model: torch.nn.Module, broken: int | None = None) -> tuple[dict, np.ndarray]:
    job = TrainJob(labels=str(_photos(tmp_path, broken=broken)), run_name="r", storage=str(tmp_path),
                   preset="tiny", batch_pairs=2)
    _, data = prepare_data(job)
    env = dict(job=job, cfg=get_preset("tiny"), detector=None, liqe=None, cache=FeatureCache("fp"),
               device=torch.device("cpu"), marker=str(tmp_path / "marker"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pairs = epoch_pairs(data["train"][2], 0, job.seed, per_image=job.pairs_per_image)
    return _train_epoch(model, opt, data, 0, 0, 1, False, **env), pairs


def test_training_images_that_fail_to_load_are_counted(tmp_path: Path) -> None:
    mine, pairs = _epoch(tmp_path, _MeanScore(1, 1), broken=2)
    metrics, failed = train_metrics([mine], seconds=1.0)
    hit = int((pairs == 2).any(axis=1).sum())  # every pair with the truncated image
    assert hit >= 1 and metrics["train_failed_images"] == 1 and metrics["train_dropped_pairs"] == hit
    assert metrics["pairs"] == len(pairs) - hit == 2 * 5 - hit
    assert len(failed) == 1 and failed[0].startswith(f"{tmp_path / '2.jpg'}: truncated: ")


def test_a_nonfinite_training_loss_fails_the_epoch(tmp_path: Path) -> None:
    model = _MeanScore(1, 1)
    torch.nn.init.constant_(model.bias, float("nan"))
    weight = model.weight.item()
    with pytest.raises(FloatingPointError, match="epoch 1, step 1: the training loss is nan, the model diverged"):
        _epoch(tmp_path, model)
    assert model.weight.item() == weight  # no optimiser step on it
