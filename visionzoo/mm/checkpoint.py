"""Loading backbone weights for ``init_cfg=dict(type="Pretrained", checkpoint=...)`` — tensors only.

mmengine's own ``PretrainedInit`` unpickles whatever the file holds. visionzoo never does: files are
read with ``torch.load(weights_only=True)`` (plus the few classes the family's own loader allow-lists,
e.g. ``argparse.Namespace`` in official training states) or with safetensors. A file that needs more
(a checkpoint saved by mmengine's Runner pickles its message hub and history buffers) stops with
:class:`UnsafeCheckpointError`, a one-line message naming the offending object and the explicit way
out (``python -m visionzoo.mm.extract_weights --trust IN OUT`` writes a tensors-only copy).

Accepted layouts, each adapted by the family's ``checkpoint_filter_fn``: official classification
files (``{"model": ...}``, training states), official mmdet / mmseg files (``state_dict`` with
``backbone.`` keys), visionzoo / timm state dicts, and checkpoints of a model that used
``visionzoo.Backbone`` (``backbone.body.model.`` / ``backbone.pyramid.`` keys).
"""
from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..models import VISIONZOO_MODELS
from ..models._loading import UnsafeCheckpointError, select_state_dict, torch_load_restricted

__all__ = [
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "guess_family",
    "load_backbone_checkpoint",
    "read_tensors",
]


class CheckpointMismatchError(ValueError):
    """The file's weights do not fit the backbone (another model / family, or missing weights)."""


def _family_safe_globals(module_name: str) -> tuple:
    module = importlib.import_module(module_name)
    globs = getattr(module, "_CHECKPOINT_GLOBALS", None)
    if globs is None:
        import argparse
        globs = (argparse.Namespace,)  # what official training states pickle (Vim, BiFormer, DeiT-style files)
    return tuple(globs)


def read_tensors(path: str | os.PathLike, safe_globals: Iterable[Any] = ()) -> dict[str, Any]:
    """Read ``path`` with ``torch.load(weights_only=True)`` (``safe_globals`` allowed) or safetensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    try:
        return torch_load_restricted(path, safe_globals)
    except UnsafeCheckpointError as e:  # the same refusal, with the mm way out
        what = f"a pickled {e.global_name}" if e.global_name else "pickled Python objects"
        raise UnsafeCheckpointError(
            f"checkpoint {path!r} holds {what} besides tensors, which visionzoo does not unpickle "
            f"(it reads files with torch.load(weights_only=True)); if you trust the file, write a tensors-only "
            f"copy with `python -m visionzoo.mm.extract_weights --trust {path} OUT.pth` and load OUT.pth",
            e.global_name) from None


def _strip(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _normalise(key: str) -> str:
    return re.sub(r"\d+", "#", key)


@functools.cache
def _family_key_patterns() -> dict[str, frozenset]:
    """Digit-free key patterns of each family's visionzoo state dict (tiny test variants, built on meta)."""
    import timm

    patterns = {}
    for family in sorted({m.family for m in VISIONZOO_MODELS.values()}):
        name = f"test_{family}"
        if not timm.is_model(name):
            continue
        with torch.device("meta"):
            model = timm.create_model(name)
        patterns[family] = frozenset(_normalise(k) for k in model.state_dict())
    return patterns


def guess_family(keys: Iterable[str]) -> str | None:
    """The visionzoo family whose state-dict key patterns cover most of ``keys`` (None when unclear)."""
    pats = {_normalise(k) for k in keys}
    if not pats:
        return None
    scores = {fam: len(pats & fam_pats) / len(pats) for fam, fam_pats in _family_key_patterns().items()}
    best = max(scores, key=scores.get)
    return best if scores[best] >= 0.5 else None


def _fmt(keys: list) -> str:
    return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")


def load_backbone_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    model_name: str,
    full_keys: Iterable[str],
    pyramid: nn.Module | None = None,
    prefix: str | None = None,
    use_ema: bool = False,
) -> None:
    """Load ``path`` into the timm ``model`` inside a features backbone, strictly, reading tensors only.

    Args:
        model: the (pruned) timm model of the backbone (``features.model``).
        path: the checkpoint file.
        model_name: for messages.
        full_keys: state-dict keys of the unpruned model; checkpoint entries for parts pruned away by
            ``features_only`` (classifier head, final norm) are dropped, any other mismatch is an error.
        pyramid: the backbone's simple feature pyramid, loaded from ``pyramid.`` entries when present.
        prefix: keep only keys with this prefix (stripped), e.g. ``"backbone."``; default: auto.
        use_ema: take ``model_ema`` / ``state_dict_ema`` from a training state.
    """
    where = f"visionzoo.Backbone({model_name})"
    family_module = type(model).__module__
    meta = VISIONZOO_MODELS.get(model_name)
    family = meta.family if meta else None
    filter_fn = getattr(importlib.import_module(family_module), "checkpoint_filter_fn", None)

    checkpoint = read_tensors(path, _family_safe_globals(family_module))
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(f"{where}: checkpoint {os.fspath(path)!r} is a {type(checkpoint).__name__}, "
                                      f"not a state dict")
    state_dict = dict(select_state_dict(checkpoint, use_ema=use_ema))
    if prefix:
        if not any(k.startswith(prefix) for k in state_dict):
            raise CheckpointMismatchError(f"{where}: checkpoint {os.fspath(path)!r} has no key with prefix {prefix!r}")
        state_dict = _strip(state_dict, prefix)
    elif any(k.startswith("backbone.") for k in state_dict):  # a whole mmdet / mmseg model
        state_dict = _strip(state_dict, "backbone.")
    pyramid_sd = _strip(state_dict, "pyramid.")
    if any(k.startswith("body.model.") for k in state_dict):  # a visionzoo.Backbone state dict
        state_dict = _strip(state_dict, "body.model.")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("pyramid.")}

    guessed = guess_family(state_dict)
    hint = (f"; its keys look like a {guessed} checkpoint, not {family}"
            if guessed and family and guessed != family else "")
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as e:  # noqa: BLE001  (a foreign file often breaks the family's key adaptation first)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointMismatchError(
                f"{where}: checkpoint {os.fspath(path)!r} does not fit {family or model_name} "
                f"(its checkpoint_filter_fn failed: {type(e).__name__}: {reason}){hint}") from None

    own = set(model.state_dict())
    pruned = set(full_keys) - own
    state_dict = {k: v for k, v in state_dict.items() if k not in pruned}
    missing = sorted(own - set(state_dict))
    unexpected = sorted(set(state_dict) - own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_fmt(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_fmt(unexpected)})")
        raise CheckpointMismatchError(
            f"{where}: checkpoint {os.fspath(path)!r} does not fit {family or model_name}: "
            + "; ".join(parts) + hint)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # shape mismatches: another variant of the same family
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise CheckpointMismatchError(
            f"{where}: checkpoint {os.fspath(path)!r} has other shapes than {model_name} "
            f"({len(lines)} tensors, e.g. {lines[0] if lines else str(e).splitlines()[0]}); "
            f"is it another variant?") from None
    if pyramid is not None and pyramid_sd:
        pyramid.load_state_dict(pyramid_sd, strict=True)
