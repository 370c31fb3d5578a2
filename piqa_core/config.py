"""Configuration dataclasses and the named preset registry.

A checkpoint's ``config.json`` is ``PIQAConfig.to_dict()``: it fully determines the network,
its preprocessing, the face detector settings and the LIQE branch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CROP_MODES = ("five", "center")
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class ModelConfig:
    """The dual-branch network: two timm backbones and the regression head."""

    backbone: str = "swin_base_patch4_window12_384"
    # Overrides passed to timm.create_model (the tiny preset shrinks the Swin here).
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    aux_dim: int = 495
    hidden_dim: int = 128
    dropout: float = 0.1


@dataclass
class PreprocessConfig:
    """Decode guards and the official Resize(448) -> crop(384) -> Normalize transform."""

    resize: int = 448
    crop: int = 384
    crop_mode: str = "five"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Decompression-bomb guard, checked on the header before any pixel is decoded.
    max_pixels: int = 120_000_000
    # Shorter side below this is `too_small` (LIQE needs at least one 224x224 patch).
    min_side: int = 224

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")


@dataclass
class FaceConfig:
    """RetinaFace detection on a downscaled copy; crop in original pixels."""

    enabled: bool = True
    backbone: str = "Resnet50"
    detect_long_side: int = 640
    confidence_threshold: float = 0.7
    nms_threshold: float = 0.4
    margin: int = 20


@dataclass
class LiqeConfig:
    """LIQE auxiliary features: a CLIP model scored against 495 quality prompts."""

    enabled: bool = True
    # open_clip model config (embed_dim, vision_cfg, text_cfg); ViT-B/32 by default.
    clip_cfg: dict[str, Any] = field(
        default_factory=lambda: {
            "embed_dim": 512,
            "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
        }
    )
    patch: int = 224
    stride: int = 32
    num_patches: int = 15
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass
class PIQAConfig:
    """Everything a scorer needs besides weights."""

    preset: str = "dn-piqa"
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    liqe: LiqeConfig = field(default_factory=LiqeConfig)

    def __post_init__(self) -> None:
        want = 495 if self.liqe.enabled else 0
        if self.model.aux_dim != want:
            raise ValueError(
                f"model.aux_dim={self.model.aux_dim} but liqe.enabled={self.liqe.enabled} needs {want}"
            )
        if self.liqe.enabled and self.preprocess.min_side < self.liqe.patch:
            # A smaller image has no LIQE patch: it must be refused as too_small at decode, not fail later.
            raise ValueError(f"preprocess.min_side={self.preprocess.min_side} is below the "
                             f"{self.liqe.patch}-pixel LIQE patch")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PIQAConfig":
        def build(kind: type, values: dict[str, Any]) -> Any:
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
            values = {k: tuple(v) if k in ("mean", "std") else v for k, v in values.items()}
            return kind(**values)

        # A section a newer piqa added would change the scores if it were dropped here.
        sections = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - sections
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        return cls(
            preset=d.get("preset", "custom"),
            model=build(ModelConfig, d.get("model", {})),
            preprocess=build(PreprocessConfig, d.get("preprocess", {})),
            face=build(FaceConfig, d.get("face", {})),
            liqe=build(LiqeConfig, d.get("liqe", {})),
        )

    def replace(self, **sections: Any) -> "PIQAConfig":
        """Copy with whole sections or top-level fields replaced."""
        return dataclasses.replace(self, **sections)


_PRESETS: dict[str, Callable[[], PIQAConfig]] = {}
_ALIASES: dict[str, str] = {}


def register_preset(name: str, *aliases: str) -> Callable[[Callable[[], PIQAConfig]], Callable[[], PIQAConfig]]:
    def deco(fn: Callable[[], PIQAConfig]) -> Callable[[], PIQAConfig]:
        _PRESETS[name] = fn
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return deco


def list_presets() -> list[str]:
    return sorted(_PRESETS)


class UnknownPresetError(KeyError, ValueError):
    """An unknown preset name: a KeyError for lookups, a ValueError for handlers of user input (the CLI)."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError's str() would wrap the message in quotes


def get_preset(name: str) -> PIQAConfig:
    """A fresh config for a named preset (aliases accepted)."""
    key = _ALIASES.get(name, name)
    if key not in _PRESETS:
        raise UnknownPresetError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return _PRESETS[key]()


@register_preset("dn-piqa", "dn_piqa", "piq23")
def _dn_piqa() -> PIQAConfig:
    """The paper's model: two Swin-B/384, LIQE ViT-B/32, RetinaFace-R50 at 640 px."""
    return PIQAConfig(preset="dn-piqa")


@register_preset("tiny")
def _tiny() -> PIQAConfig:
    """A ~3 M-parameter stand-in with the same structure, for tests and the demo."""
    return PIQAConfig(
        preset="tiny",
        model=ModelConfig(
            backbone="swin_base_patch4_window12_384",
            backbone_kwargs={
                "img_size": 64,
                "window_size": 4,
                "embed_dim": 48,
                "depths": [2, 2, 2],
                "num_heads": [3, 6, 12],
            },
        ),
        preprocess=PreprocessConfig(resize=72, crop=64),
        face=FaceConfig(detect_long_side=160),
        liqe=LiqeConfig(
            clip_cfg={
                "embed_dim": 64,
                "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
            }
        ),
    )
