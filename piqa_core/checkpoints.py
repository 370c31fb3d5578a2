"""Weights: our checkpoint format and safe loading (official imports: ``official.py``, remote
sources and their cache: ``weight_cache.py``).

A model directory holds ``config.json`` (``PIQAConfig`` + metadata) and ``model.safetensors`` with
three prefixes: ``model.`` (DualBranchPIQA), ``liqe.`` (CLIP + its 495 text features), ``face.``
(RetinaFace). Every load is strict; pickles are read with ``weights_only=True`` and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from .config import PIQAConfig, get_preset
from .faces import FaceDetector
from .liqe import LIQE
from .model import DualBranchPIQA

FORMAT = "piqa-checkpoint/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A weights file is missing, unsafe, or does not match the model; the message says what to do."""


# The three networks a bundle may hold; a process that runs only one stage loads only its part.
PARTS = ("model", "liqe", "face")


@dataclass
class Bundle:
    """Everything a scorer runs: config, the three networks and where the weights came from.

    A bundle built or loaded with fewer ``parts`` has ``None`` for the others (the Ray prep stage
    needs only the detector, the scoring stage only the model and LIQE).
    """

    config: PIQAConfig
    model: DualBranchPIQA | None
    liqe: LIQE | None
    detector: FaceDetector | None
    model_id: str
    random_init: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    parts: tuple[str, ...] = PARTS
    # frozen networks (of "liqe", "face") a trained model holds at random init: it was trained without them
    random_parts: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._require_all("state_dict")
        sd = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.liqe is not None:
            sd.update({f"liqe.{k}": v for k, v in self.liqe.state_dict().items()})
        if self.detector is not None:
            sd.update({f"face.{k}": v for k, v in self.detector.state_dict().items()})
        return sd

    @property
    def sha256(self) -> str:
        """sha256 of the serialised weights: equals the sha256 of a saved ``model.safetensors``."""
        if "sha256" not in self.meta:
            self.meta["sha256"] = hashlib.sha256(_serialise(self.state_dict())).hexdigest()
        return self.meta["sha256"]

    def _require_all(self, what: str) -> None:
        if set(self.parts) != set(PARTS):
            raise CheckpointError(f"{what} needs the whole bundle; this one holds only {self.parts}")


def _serialise(sd: Mapping[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in sorted(sd.items())})


# ----------------------------------------------------------------------------- safe loading


def clean_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Strip DataParallel / torch.compile prefixes and unwrap {'state_dict': ...} containers."""
    for key in ("state_dict", "model"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def torch_load(source: str | os.PathLike | bytes, where: str | None = None) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``; also reads the legacy one-member zip of torch-hub releases.

    Whatever does not load is a :class:`CheckpointError` naming the file (``where`` names bytes).
    """
    where = where or ("<bytes>" if isinstance(source, bytes) else os.fspath(source))
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                members = zf.infolist()
                if len(members) == 1 and not members[0].is_dir():
                    data = zf.read(members[0])
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only names the blocked GLOBAL for pickled code; any other unpickling error is just bad bytes
        blocked = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not blocked:
            raise _unreadable(where) from None
        raise CheckpointError(
            f"{where}: refused to load: the file holds pickled Python objects beyond tensors "
            f"({blocked[0]}). Only plain state dicts are accepted; re-save it with "
            "torch.save(model.state_dict(), path) or convert it to safetensors."
        ) from None
    except MemoryError:
        raise
    except Exception:  # torch raises RuntimeError, KeyError, EOFError, … depending on how the bytes are wrong
        raise _unreadable(where) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a state dict, got {type(obj).__name__}")
    return clean_state_dict(obj)


def _unreadable(where: str) -> CheckpointError:
    return CheckpointError(f"{where}: not a readable torch checkpoint (truncated, or another kind of file?)")


_PRESET_HINT = "Check that the file is the one this loader expects and that --preset matches it."


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, hint: str = _PRESET_HINT) -> None:
    """``load_state_dict(strict=True)`` with a message that names the keys and the likely cause."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{what}: the weights do not match the model configuration."]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:6]) + (f" … (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                lines.append(f"  {label} ({len(keys)}): {shown}")
        lines.append("  " + hint)
        raise CheckpointError("\n".join(lines))
    if any(p.is_meta for p in module.parameters()):  # built by _empty_parameters: take the tensors as they are
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True, assign=True)
        _init_derived_buffers(module)
    else:
        module.load_state_dict(sd, strict=True)


def _init_derived_buffers(module: nn.Module) -> None:
    """Recompute buffers that were derived from a parameter's device while it was on meta.

    timm's Swin blocks build their attention mask on ``norm1.weight.device`` and can rebuild it with
    ``_init_buffers()``; any other module left with a meta buffer is refused rather than run.
    """
    for name, m in module.named_modules():
        if any(b.is_meta for b in m.buffers(recurse=False)):
            if not hasattr(m, "_init_buffers"):
                raise CheckpointError(f"{type(m).__name__} {name!r} keeps an uninitialised buffer after loading; "
                                      "load it into a module built normally (build_bundle) instead")
            m._init_buffers()


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with it removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- bundles


def _check_parts(parts: tuple[str, ...]) -> tuple[str, ...]:
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
    return tuple(p for p in PARTS if p in parts)


def build_bundle(config: PIQAConfig | str, seed: int = 0, text_features: bool = True,
                 parts: tuple[str, ...] = PARTS) -> Bundle:
    """Randomly initialised networks for a config. Random weights are marked and never a quality model.

    ``text_features=False`` skips encoding the 495 prompts (30 s for ViT-B/32 on CPU) when a load
    will overwrite them anyway. Each part is initialised from its own seeded generator state, so a
    part built alone equals the same part of a whole bundle.
    """
    cfg = get_preset(config) if isinstance(config, str) else config
    parts = _check_parts(parts)
    nets: dict[str, Any] = {}
    for i, part in enumerate(PARTS):
        if part in parts:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 7919 * i)  # i = 0: the model keeps the plain seed
                nets[part] = _build_part(cfg, part)
    liqe = nets.get("liqe")
    if liqe is not None and text_features:
        liqe.refresh_text_features()
    return Bundle(cfg, nets.get("model"), liqe, nets.get("face"), model_id=f"random-{cfg.preset}-seed{seed}",
                  random_init=True, parts=parts)


def _build_part(cfg: PIQAConfig, part: str) -> nn.Module | None:
    if part == "model":
        net: nn.Module | None = DualBranchPIQA(cfg.model)
    elif part == "liqe":
        net = LIQE(cfg.liqe) if cfg.liqe.enabled else None
    else:
        net = FaceDetector(cfg.face) if cfg.face.enabled else None
    return net.eval() if net is not None else None


_META = threading.local()  # depth of _empty_parameters in this thread
_PATCH_LOCK = threading.Lock()
_PATCH: dict[str, Any] = {"users": 0, "register": None}


def _register_maybe_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    # The patch is process-wide: only threads inside _empty_parameters build on the meta device.
    if param is not None and getattr(_META, "depth", 0) and not param.is_meta:
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _PATCH["register"](module, name, param)


@contextlib.contextmanager
def _empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device: no random init to pay for.

    Buffers stay real: the non-persistent ones (Swin's attention masks and position indices,
    CLIP's causal mask, the detector's mean/std) are computed in ``__init__`` and never saved.
    A strict :func:`load_strict` then assigns every parameter (dn-piqa: 3.5 s of init saved per load).
    Threads may overlap in any order: the patch is counted in and out under a lock.
    """
    with _PATCH_LOCK:
        if _PATCH["users"] == 0:
            _PATCH["register"] = nn.Module.register_parameter
            nn.Module.register_parameter = _register_maybe_meta
        _PATCH["users"] += 1
    _META.depth = getattr(_META, "depth", 0) + 1
    try:
        yield
    finally:
        _META.depth -= 1
        with _PATCH_LOCK:
            _PATCH["users"] -= 1
            if _PATCH["users"] == 0:
                nn.Module.register_parameter = _PATCH["register"]


def save_checkpoint(bundle: Bundle, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> str:
    """Write ``config.json`` + ``model.safetensors``; returns the weights' sha256."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    blob = _serialise(bundle.state_dict())
    digest = hashlib.sha256(blob).hexdigest()
    tmp = out / (WEIGHTS_FILE + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, out / WEIGHTS_FILE)
    meta = {
        "format": FORMAT,
        "model_id": bundle.model_id,
        "random_init": bundle.random_init,
        "random_parts": list(bundle.random_parts),
        "sha256": digest,
        "config": bundle.config.to_dict(),
        **(extra or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    bundle.meta["sha256"] = digest
    return digest


def is_piqa_format(fmt: Any) -> bool:
    """A ``format`` written by some piqa version (this one reads :data:`FORMAT` only)."""
    return isinstance(fmt, str) and fmt.startswith(FORMAT.split("/")[0] + "/")


def parse_meta(text: bytes | str, where: str) -> dict[str, Any]:
    """A model directory's config.json, checked: our format, with a config and the weights' sha256."""
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where} is not JSON ({e}): is this a piqa model directory?") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        if is_piqa_format(got):
            raise CheckpointError(f"{where}: written by another piqa version (format {got!r}; this piqa reads "
                                  f"{FORMAT!r}): load it with the piqa version that wrote it, or upgrade piqa")
        raise CheckpointError(f"{where}: unknown format {got!r}, expected {FORMAT!r} (a piqa model "
                              "directory, made by `piqa weights import-official` or `piqa train`)")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("sha256"), str):
        raise CheckpointError(f"{where}: incomplete, needs 'config' and 'sha256'; write the directory again")
    return meta


def load_checkpoint(directory: str | os.PathLike, verify: bool = True, parts: tuple[str, ...] = PARTS) -> Bundle:
    """Load a model directory written by ``save_checkpoint`` (strict, sha256-verified).

    ``parts`` builds and reads only those networks (the Ray prep stage needs only the detector's
    100 MB of a 1.4 GB file); the file is still verified whole, streamed, never held in memory.
    """
    root = Path(directory)
    cfg_path, w_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(
            f"{root} is not a model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}). "
            "Create one with `piqa weights import-official` or `piqa train`."
        )
    meta = parse_meta(cfg_path.read_bytes(), str(cfg_path))
    before = w_path.stat()
    digest = _file_sha256(w_path)
    if verify and meta.get("sha256") not in (None, digest):
        raise CheckpointError(f"{w_path} is corrupt or was replaced: sha256 {digest} != {meta['sha256']}")
    try:
        cfg = PIQAConfig.from_dict(meta["config"])
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path}: its config does not fit this piqa version ({e}); a newer piqa "
                              "may have written it: upgrade piqa to load it") from None
    parts = _check_parts(parts)
    nets: dict[str, nn.Module | None] = {}
    try:
        with safe_open(w_path, framework="pt") as f:
            stray = sorted(k for k in f.keys() if not k.startswith(tuple(p + "." for p in PARTS)))
            if stray:
                raise CheckpointError(f"{w_path}: unexpected tensors {stray[:5]}")
            for part in parts:
                with _empty_parameters():
                    nets[part] = _build_part(cfg, part)
                if nets[part] is not None:
                    sd = {k[len(part) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(part + ".")}
                    load_strict(nets[part], sd, f"{w_path}: {part}", hint=(
                        f"The directory's {CONFIG_FILE} describes another model than its {WEIGHTS_FILE}: one of "
                        "the two was edited or copied from elsewhere. Write the directory again."))
    except SafetensorError as e:
        raise CheckpointError(f"{w_path}: not a readable safetensors file ({e}); truncated? "
                              "Write the model directory again") from None
    after = w_path.stat()
    if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size, after.st_mtime_ns):
        raise CheckpointError(f"{w_path} was replaced while it was being loaded; load it again")
    bundle = Bundle(cfg, nets.get("model"), nets.get("liqe"), nets.get("face"), model_id="", parts=parts)
    bundle.model_id, bundle.random_init = meta.get("model_id", root.name), bool(meta.get("random_init"))
    bundle.random_parts = tuple(meta.get("random_parts", ()))
    bundle.meta = {"sha256": digest, **{k: v for k, v in meta.items() if k not in ("config", "sha256")}}
    return bundle


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()
