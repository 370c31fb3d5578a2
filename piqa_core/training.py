"""Training-side helpers shared by ``ray_jobs.train`` and the benchmark (no Ray, no storage here).

* ``pair_loss`` / ``predict`` / ``val_metrics`` / ``train_metrics``: the fidelity-loss step on
  prepared pairs, five-crop scoring, the validation and training summaries reported each epoch.
* ``init_bundle``, ``make_optimizer``, ``epoch_pairs`` / ``shard`` / ``crop_rngs`` / ``seed_torch``:
  start weights, the official optimiser, the epoch's pairs per rank, deterministic randomness.
* ``prefetch``, ``object_group`` / ``all_gather``: threaded data preparation, object collectives.
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .checkpoints import Bundle, build_bundle, clean_state_dict, load_checkpoint, load_strict, torch_load
from .official import (backbone_from_official, clip_cfg_from_openai, load_liqe_openai, load_retinaface,
                       official_to_ours)
from .config import PIQAConfig, get_preset
from .losses import fidelity_loss, sample_pairs
from .metrics import MIN_GROUP, evaluate
from .preprocess import normalize

Source = str | os.PathLike | bytes


def _inputs(cols: dict[str, np.ndarray], cfg: PIQAConfig, device: torch.device) -> tuple[torch.Tensor, ...]:
    pp = cfg.preprocess
    take = lambda k: torch.from_numpy(np.ascontiguousarray(cols[k])).to(device)  # noqa: E731
    aux = take("aux") if cfg.model.aux_dim else None
    return normalize(take("whole"), pp.mean, pp.std), normalize(take("face"), pp.mean, pp.std), aux


def pair_loss(model: torch.nn.Module, cols: dict[str, np.ndarray], labels: np.ndarray, cfg: PIQAConfig,
              device: torch.device, bf16: bool = False, world: int = 1) -> tuple[torch.Tensor, float, int, int]:
    """Fidelity loss of prepared pairs: rows [0, n) are the first images, [n, 2n) their partners.

    Returns the loss to back-propagate, the sum of this rank's valid pair losses (nan when any rank's
    is), their count, and the valid pairs of all ranks (0: the caller skips the optimiser step, which
    would still move every weight through momentum and weight decay).
    ``model`` is called (not ``score_crops``) so a DDP wrapper sees the forward. Pairs with an image
    that failed to load keep their (zero) rows, so every rank runs the same forward, but weigh 0.
    With ``world`` > 1 ranks, the loss is scaled by the valid pairs of all ranks: DDP averages the
    ranks' gradients, and the step is then the mean over the step's valid pairs however they fall.
    """
    n = len(labels) // 2
    whole, face, aux = _inputs(cols, cfg, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        scores = model(whole[:, 0], face[:, 0], aux)
    per_pair = fidelity_loss(scores[:n], scores[n:], labels[:n], labels[n:], reduction="none")
    ok = cols["status"] == "ok"
    valid = torch.from_numpy((ok[:n] & ok[n:]).astype(np.float32)).to(device)
    total, count = (per_pair * valid).sum(), valid.sum()
    step = torch.stack([total.detach(), count])
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(step)
    loss = total * world / step[1].clamp(min=1.0)
    # nan on any rank is nan on all: every rank stops before its step, none waits in the all-reduce
    local = float(total.detach()) if math.isfinite(float(step[0])) else math.nan
    return loss, local, int(count.item()), int(step[1].item())


@torch.inference_mode()
def predict(model: torch.nn.Module, cols: dict[str, np.ndarray], cfg: PIQAConfig, device: torch.device,
            bf16: bool = False) -> np.ndarray:
    """Scores (mean over the prepared crops; nan for failed images) with the unwrapped model."""
    whole, face, aux = _inputs(cols, cfg, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        scores = model.score_crops(whole, face, aux).float().cpu().numpy()
    return np.where(cols["status"] == "ok", scores, np.nan)


def val_metrics(pred: np.ndarray, labels: np.ndarray, groups: Sequence[Any], loaded: np.ndarray) -> dict[str, Any]:
    """Validation summary for ``ray.train.report``; only finite scores of loaded images are evaluated.

    ``loaded``: which images were read and decoded. The others count as ``val_failed``; loaded images
    the model scored nan or inf count as ``val_nonfinite`` (a diverging model, not a bad file).
    ``val_srcc_mean`` ranks the checkpoints, so it is taken over the same groups every epoch: those with
    3+ validation images whose labels vary (``val_ranked_groups``), a group without an SRCC that epoch
    (scored constant, or short of loaded images) counting 0: dropping it would let a collapsing epoch
    outrank a sound one. -1 when no group qualifies or when the model scored any loaded image nan or
    inf (such an epoch is never exported while a sound one is kept).
    """
    pred, loaded, labels = np.asarray(pred, np.float64), np.asarray(loaded, bool), np.asarray(labels, np.float64)
    ok = loaded & np.isfinite(pred)
    rep = evaluate(pred[ok], labels[ok], [g for g, k in zip(groups, ok) if k])
    srcc = {r["group"]: r["srcc"] for r in rep.per_group}
    members: dict[Any, list[float]] = {}
    for g, y in zip(groups, labels):
        members.setdefault(g, []).append(y)
    ranked = [g for g, ys in members.items() if len(ys) >= MIN_GROUP and np.ptp(ys) > 0]
    nonfinite = int((loaded & ~ok).sum())
    defined = [srcc.get(g, math.nan) for g in ranked]
    rank = float(np.mean([v if math.isfinite(v) else 0.0 for v in defined])) if ranked and not nonfinite else -1.0
    num = lambda v: float(v) if v is not None and math.isfinite(v) else -1.0  # noqa: E731
    return {"val_srcc_mean": rank, "val_srcc_median": num(rep.median["srcc"]),
            "val_plcc_mean": num(rep.mean["plcc"]), "val_krcc_mean": num(rep.mean["krcc"]),
            "val_valid_groups": int(rep.mean["valid_groups"]), "val_ranked_groups": len(ranked),
            "val_items": int(ok.sum()),
            "val_failed": int((~loaded).sum()), "val_nonfinite": nonfinite}


def check_loss(loss: float, epoch: int, step: int) -> float:
    """``loss``, or ``FloatingPointError`` when it is nan/inf: stepping on it would ruin every weight."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"epoch {epoch + 1}, step {step + 1}: the training loss is {loss}, the model "
                                 "diverged (a rerun repeats it): start a new run with a lower --lr, from an "
                                 "earlier epoch_NNNN checkpoint of this one (--init) if you like")
    return loss


def batch_failures(cols: dict[str, np.ndarray], idx: np.ndarray, uris: Sequence[str]) -> tuple[dict[int, str], int]:
    """Of one batch of pairs (rows [0, n) first images, [n, 2n) partners, ``idx`` their indices): the
    images that failed to load (index -> "uri: code: message") and how many pairs they dropped."""
    ok = cols["status"] == "ok"
    n = len(idx) // 2
    failed = {int(idx[i]): f"{uris[idx[i]]}: {cols['error_code'][i]}: {cols['error_message'][i]}"
              for i in np.flatnonzero(~ok)}
    return failed, int((~(ok[:n] & ok[n:])).sum())


def train_metrics(parts: Sequence[dict[str, Any]], seconds: float) -> tuple[dict[str, Any], list[str]]:
    """One epoch's training summary from every rank's ``loss_sum, pairs, dropped_pairs, failed``, and
    the messages of the failed images (in index order) for the log.

    ``failed`` (index -> message) is merged, so an image that failed on two ranks counts once.
    """
    pairs = sum(int(p["pairs"]) for p in parts)
    failed = {k: v for p in parts for k, v in p["failed"].items()}
    return ({"train_loss": float(sum(p["loss_sum"] for p in parts) / max(pairs, 1)), "pairs": pairs,
             "pairs_per_s": float(pairs / seconds), "train_failed_images": len(failed),
             "train_dropped_pairs": sum(int(p["dropped_pairs"]) for p in parts)},
            [failed[k] for k in sorted(failed)])


def format_val_srcc(metrics: dict[str, Any]) -> str:
    """:func:`val_metrics`' SRCC for people: "n/a" where no group was large enough (-1.0 is for ranking)."""
    if metrics.get("val_nonfinite"):
        return f"n/a (the model scored {metrics['val_nonfinite']} validation image(s) nan or inf)"
    if not metrics.get("val_ranked_groups", metrics.get("val_valid_groups")):  # older histories lack the first
        return "n/a (no validation group large enough)"
    if not metrics.get("val_valid_groups"):
        return "0 (the model scored every validation group constant, or too few of its images loaded)"
    return f"mean {metrics['val_srcc_mean']:.4f} median {metrics['val_srcc_median']:.4f}"


def prefetch(fn: Callable[[int], Any], n: int, threads: int) -> Iterator[Any]:
    """fn(0), …, fn(n-1) in order, computed ``threads`` steps ahead (decode and resize release the GIL)."""
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(pool.submit(fn, i) for i in range(min(threads + 1, n)))
        nxt = len(pending)
        while pending:
            out = pending.popleft().result()
            if nxt < n:
                pending.append(pool.submit(fn, nxt))
                nxt += 1
            yield out


def object_group(world: int) -> Any:
    """A gloo process group for Python-object collectives (NCCL would need them on the GPU)."""
    import torch.distributed as dist

    if world == 1:
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def all_gather(obj: Any, world: int, group: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` without a process group)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def epoch_pairs(groups: Sequence[Any], epoch: int, seed: int = 0, fixed: np.ndarray | None = None,
                per_image: int = 1) -> np.ndarray:
    """The epoch's pairs in training order: re-sampled within groups, ``per_image`` partners for each
    image (or a fixed list), then shuffled."""
    rng = np.random.default_rng([seed, epoch])  # not seed + epoch: seed 1 would replay seed 0 one epoch on
    pairs = sample_pairs(groups, rng, per_image) if fixed is None else fixed
    return pairs[rng.permutation(len(pairs))]


def shard(pairs: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """(pair ids, pairs) of one rank; every rank gets the same count (DDP needs equal step counts)."""
    n = len(pairs) // world * world
    ids = np.arange(rank, n, world)
    return ids, pairs[ids]


def rank_batch(batch_pairs: int, world: int) -> int:
    """Pairs per rank and step. ``batch_pairs`` is the step's total over all ranks, as in the official
    recipe (one batch split over GPUs): with ``shard``'s interleaving, step s covers the epoch's pairs
    [s·batch_pairs, (s+1)·batch_pairs) whatever the worker count."""
    if batch_pairs % world:
        raise ValueError(f"--batch-pairs {batch_pairs} does not split evenly over {world} workers: "
                         f"use a multiple of {world}")
    return batch_pairs // world


def seed_torch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch's global RNG (dropout) per (seed, epoch, rank): a resumed epoch draws the same masks."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def crop_rngs(seed: int, epoch: int, pair_ids: np.ndarray) -> list[np.random.Generator]:
    """One RNG per image slot of each pair (first images, then partners), independent of sharding."""
    return [np.random.default_rng([seed, epoch, int(p), slot]) for slot in (0, 1) for p in pair_ids]


def make_optimizer(model: torch.nn.Module, lr: float = 1e-5, weight_decay: float = 1e-7, step: int = 2,
                   gamma: float = 0.9) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """The official optimiser: Adam (lr 1e-5, wd 1e-7) with StepLR(2, 0.9) stepped once per epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=gamma)


def _state(src: Source, option: str) -> dict[str, torch.Tensor]:
    """A start-weight file; a remote one (bytes) is named in errors by its ``option``."""
    if isinstance(src, bytes):
        return torch_load(src, where=f"{option} (remote file)")
    return torch_load(os.fspath(src))


def _frozen_parts(bundle: Bundle, **sources: Source | None) -> tuple[str, ...]:
    """The frozen networks (``liqe``, ``face``) the bundle has and no weights were given for."""
    nets = {"liqe": bundle.liqe, "face": bundle.detector}
    return tuple(p for p, src in sources.items() if src is None and nets[p] is not None)


def init_bundle(preset: str = "dn-piqa", seed: int = 0, init: Source | None = None,
                init_whole: Source | None = None, init_face: Source | None = None,
                liqe: Source | None = None, retinaface: Source | None = None) -> tuple[Bundle, list[str]]:
    """The networks training starts from, and warnings about parts left random.

    ``init``: a model directory (ours: everything is loaded) or the official ``PIQ_model.pth`` (both
    branches and the head). ``init_whole`` / ``init_face``: official LSVQ / GFIQA pre-training files
    for one branch (regression heads discarded). ``liqe`` (official ``LIQE.pt``) and ``retinaface``
    fill the frozen parts; without them (and without a model directory) they stay random.
    """
    if init is not None and not isinstance(init, bytes) and os.path.isdir(init):
        if liqe is not None or retinaface is not None:
            raise ValueError("a model directory already holds LIQE and RetinaFace: drop --liqe/--retinaface")
        bundle = load_checkpoint(init)
        if bundle.random_init:  # a random model directory: once trained, only its frozen parts stay random
            bundle.random_parts = _frozen_parts(bundle, liqe=None, face=None)
    else:
        cfg = get_preset(preset)
        liqe_sd = _state(liqe, "--liqe") if liqe is not None else None
        if liqe_sd is not None:
            cfg.liqe.clip_cfg = clip_cfg_from_openai(liqe_sd)
        bundle = build_bundle(cfg, seed=seed, text_features=liqe_sd is None)
        if liqe_sd is not None:
            load_liqe_openai(bundle.liqe, liqe_sd)
        if retinaface is not None and bundle.detector is not None:
            where = "(remote file)" if isinstance(retinaface, bytes) else os.fspath(retinaface)
            load_retinaface(bundle.detector.net, _state(retinaface, "--retinaface"), f"--retinaface {where}")
        if init is not None:
            load_strict(bundle.model, official_to_ours(_state(init, "--init"), bundle.model), "DN-PIQA model")
        bundle.random_parts = _frozen_parts(bundle, liqe=liqe, face=retinaface)
    names = {"liqe": "LIQE", "face": "RetinaFace"}
    warnings = [f"{names[p]} weights are random (frozen during training)" for p in bundle.random_parts]
    for branch, src, option in (("backbone", init_whole, "--init-whole"), ("backbone_face", init_face, "--init-face")):
        if src is not None:
            module = getattr(bundle.model, branch)
            weights = backbone_from_official(_state(src, option), module, face=branch == "backbone_face")
            load_strict(module, weights, f"{branch} pre-training")
        elif init is None:
            warnings.append(f"the {'face' if branch == 'backbone_face' else 'whole-image'} branch starts from random "
                            f"weights (no {option}, no --init)")
    return bundle, warnings
