"""Imports of the official releases: ``PIQ_model.pth`` (timm 0.6.7 Swin), LSVQ/GFIQA backbones, ``LIQE.pt``
(OpenAI-layout CLIP) and the RetinaFace-R50 release, each remapped once and loaded strictly."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter
from torch import nn

from .checkpoints import Bundle, CheckpointError, build_bundle, clean_state_dict, load_strict, strip_prefix, torch_load
from .config import PIQAConfig, get_preset
from .liqe import LIQE
from .model import DualBranchPIQA

RETINAFACE_FILE = "retinaface_resnet50_2020-07-20-f168fae3c.zip"

_WHOLE = "feature_extraction.feature_extraction."
_FACE = "feature_extraction_face.feature_extraction.feature_extraction."
_HEAD = "quality."


def _swin_filter_exact(sd: Mapping[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """timm's Swin filter, refusing the resampling it would silently do for another window/patch size."""
    own = backbone.state_dict()
    for k, v in sd.items():
        if k.endswith(("relative_position_bias_table", "patch_embed.proj.weight")) and k in own:
            if tuple(v.shape) != tuple(own[k].shape):
                raise CheckpointError(
                    f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}: the checkpoint is for another "
                    "Swin variant (window/patch size). Check that --preset matches the file."
                )
    return swin_filter(dict(sd), backbone)


def official_to_ours(sd: Mapping[str, torch.Tensor], model: DualBranchPIQA) -> dict[str, torch.Tensor]:
    """The one remap from the official ``PIQ_model.pth`` (timm 0.6.7 Swin) to ``DualBranchPIQA`` keys.

    Official prefixes: ``feature_extraction.feature_extraction.`` (whole Swin),
    ``feature_extraction_face.feature_extraction.feature_extraction.`` (face Swin), ``quality.0/3``
    (head). timm's own Swin filter moves ``downsample`` to the next stage and drops the
    ``relative_position_index`` / ``attn_mask`` buffers 0.6.7 saved.
    """
    sd = clean_state_dict(sd)
    known = (_WHOLE, _FACE, _HEAD)
    stray = sorted(k for k in sd if not k.startswith(known))
    if stray:
        raise CheckpointError(
            f"not an official DN-PIQA checkpoint: unexpected keys {stray[:5]}; expected prefixes {known}"
        )
    out = {f"backbone.{k}": v for k, v in _swin_filter_exact(strip_prefix(sd, _WHOLE), model.backbone).items()}
    out.update({f"backbone_face.{k}": v
                for k, v in _swin_filter_exact(strip_prefix(sd, _FACE), model.backbone_face).items()})
    out.update({f"head.{k}": v for k, v in strip_prefix(sd, _HEAD).items()})
    return out


def backbone_from_official(sd: Mapping[str, torch.Tensor], backbone: nn.Module,
                           face: bool = False) -> dict[str, torch.Tensor]:
    """Swin weights from the official pre-training files, their regression heads discarded.

    LSVQ (``Swin_b_384_in22k``): ``feature_extraction.*`` + ``quality.*``.
    GFIQA (a wrapper of that): ``feature_extraction.feature_extraction.*`` + ``quality.*``.
    A whole DN-PIQA model (``PIQ_model.pth``) holds both branches: ``face`` picks the face branch's.
    """
    sd = clean_state_dict(sd)
    if any(k.startswith(_FACE) for k in sd):
        prefix = _FACE if face else _WHOLE
    else:
        prefix = _WHOLE if any(k.startswith(_WHOLE) for k in sd) else "feature_extraction."
    body = strip_prefix(sd, prefix)
    if not body:
        raise CheckpointError("no Swin weights found: expected keys under 'feature_extraction.'")
    return _swin_filter_exact(body, backbone)


def load_retinaface(net: nn.Module, sd: Mapping[str, torch.Tensor], source: object = None) -> None:
    """RetinaFace-R50 weights, strictly; an error names the file and the release every preset expects."""
    load_strict(net, clean_state_dict(sd), f"RetinaFace {source}" if source is not None else "RetinaFace",
                hint=f"Expected retinaface-pytorch's ResNet-50 release ({RETINAFACE_FILE}), the detector of "
                     "every preset.")


def clip_cfg_from_openai(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The open_clip config matching an OpenAI-layout CLIP ViT state dict (as ``LIQE.pt``)."""
    if "visual.proj" not in sd:
        raise CheckpointError("not an OpenAI-layout CLIP ViT state dict (no 'visual.proj')")
    try:
        return _clip_cfg(sd)
    except KeyError as e:
        raise CheckpointError(f"an incomplete OpenAI-layout CLIP ViT state dict (no {e.args[0]!r})") from None


def _clip_cfg(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    layers = lambda p: len({k.split(".")[p.count(".")] for k in sd if k.startswith(p)})  # noqa: E731
    return {
        "embed_dim": int(sd["text_projection"].shape[1]),
        "vision_cfg": {
            "image_size": int(patch * grid),
            "layers": layers("visual.transformer.resblocks."),
            "width": int(width),
            "patch_size": int(patch),
        },
        "text_cfg": {
            "context_length": int(sd["positional_embedding"].shape[0]),
            "vocab_size": int(sd["token_embedding.weight"].shape[0]),
            "width": int(text_width),
            "heads": int(text_width // 64),
            "layers": layers("transformer.resblocks."),
        },
    }


def load_liqe_openai(liqe: LIQE, sd: Mapping[str, torch.Tensor]) -> None:
    """Load an OpenAI-layout CLIP (the official ``LIQE.pt``) and recompute the prompt features."""
    sd = {k: v.float() for k, v in clean_state_dict(sd).items()
          if k not in ("input_resolution", "context_length", "vocab_size")}
    load_strict(liqe.clip, sd, "LIQE CLIP")
    liqe.refresh_text_features()


def find_retinaface(path: str | os.PathLike | None = None) -> Path:
    """The RetinaFace-R50 release file: an explicit path, else the torch-hub cache."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(f"RetinaFace weights not found at {p}")
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints" / RETINAFACE_FILE
    if hub.is_file():
        return hub
    raise CheckpointError(
        f"RetinaFace weights not found. Download {RETINAFACE_FILE} (retinaface-pytorch's release "
        f"'resnet50_2020-07-20') and pass its path, or place it at {hub}."
    )


def _kind(sd: Mapping[str, Any]) -> str | None:
    """Which official file a state dict looks like: ``LIQE`` (OpenAI CLIP), ``PIQ_MODEL`` (DN-PIQA) or neither."""
    if "visual.proj" in sd:
        return "LIQE"
    if any(k.startswith((_WHOLE, _FACE)) for k in sd):
        return "PIQ_MODEL"
    return None


@contextlib.contextmanager
def _blame(arg: str, src: Any, swapped: bool) -> Iterator[None]:
    """Errors about one input name its argument and file, and suggest the likely swap."""
    try:
        yield
    except CheckpointError as e:
        where = "(a state dict)" if isinstance(src, Mapping) else os.fspath(src)
        hint = "; did you swap PIQ_MODEL and LIQE?" if swapped else ""
        raise CheckpointError(f"{arg} {where}: {e}{hint}") from None


def import_official(
    piq_model: str | os.PathLike | Mapping[str, torch.Tensor],
    liqe_weights: str | os.PathLike | Mapping[str, torch.Tensor],
    retinaface: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    config: PIQAConfig | str = "dn-piqa",
    model_id: str = "dn-piqa-official",
) -> Bundle:
    """Bundle the official ``PIQ_model.pth`` + ``LIQE.pt`` + RetinaFace release, all loaded strictly."""
    # An unknown preset fails before any read; a caller's config is copied, not given LIQE.pt's CLIP.
    cfg = get_preset(config) if isinstance(config, str) else copy.deepcopy(config)
    if not cfg.liqe.enabled:
        raise ValueError("the official model takes LIQE features (495 of its head's inputs): the config has "
                         "LIQE disabled")
    load = lambda src: src if isinstance(src, Mapping) else torch_load(src)  # noqa: E731
    liqe_sd, piq_sd = load(liqe_weights), load(piq_model)
    swapped = _kind(piq_sd) == "LIQE" or _kind(liqe_sd) == "PIQ_MODEL"
    with _blame("LIQE", liqe_weights, swapped):
        cfg.liqe.clip_cfg = clip_cfg_from_openai(liqe_sd)
        if (side := cfg.liqe.clip_cfg["vision_cfg"]["image_size"]) != cfg.liqe.patch:
            raise CheckpointError(f"its CLIP takes {side}-px images, but the config cuts {cfg.liqe.patch}-px "
                                  "LIQE patches")
    bundle = build_bundle(cfg, text_features=False)
    with _blame("PIQ_MODEL", piq_model, swapped):
        load_strict(bundle.model, official_to_ours(piq_sd, bundle.model), "DN-PIQA model")
    del piq_sd
    with _blame("LIQE", liqe_weights, swapped):
        load_liqe_openai(bundle.liqe, liqe_sd)
    if bundle.detector is not None:
        path = None if isinstance(retinaface, Mapping) else find_retinaface(retinaface)
        load_retinaface(bundle.detector.net, retinaface if path is None else torch_load(path), path)
    bundle.model_id, bundle.random_init, bundle.meta = model_id, False, {}
    return bundle
