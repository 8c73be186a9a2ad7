"""Loading official checkpoint files safely and strictly.

Official training scripts save whole training states (``{"model", "model_ema", "optimizer",
"args", ...}``), sometimes with a pickled ``argparse.Namespace``. These files are loaded with
``torch.load(weights_only=True)`` and only the classes a family names allow-listed, never with
blanket unpickling. After the family's ``checkpoint_filter_fn`` adapts keys, the state dict must
match the model exactly: anything missing or left over raises an error naming the keys, and a
tensor that ``load_state_dict`` would silently cast or load wrong (an integer tensor for a floating
parameter, NaN or infinite values) raises an error naming the key. Every error is one line.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any, Callable, Iterable

import torch
from torch import nn
from timm.models import adapt_input_conv

_logger = logging.getLogger(__name__)

_CONTAINER_KEYS = ("model", "state_dict", "module")


class WeightsError(ValueError):
    """A weights file that does not load into the model as it is; the message is one line naming the
    file and the key (the command-line tools print it as ``error: ...``)."""


class WeightsMismatchError(WeightsError, RuntimeError):
    """Keys missing from or left over in a weights file (also a ``RuntimeError``, as ``load_state_dict``'s)."""


class UnsafeCheckpointError(WeightsError):
    """The file holds pickled Python objects beyond tensors; visionzoo will not unpickle them.

    ``global_name`` is the first object torch's weights-only unpickler refused (e.g. ``posix.system``)."""

    def __init__(self, message: str, global_name: str | None = None):
        super().__init__(message)
        self.global_name = global_name


def torch_load_restricted(path: str | os.PathLike, safe_globals: Iterable[Any] = ()) -> dict:
    """``torch.load(path, weights_only=True)`` with ``safe_globals`` additionally allowed
    (``.safetensors`` files are read with safetensors).

    A file that pickles anything else raises :class:`UnsafeCheckpointError` naming the refused object
    (torch's own message puts the cause on a later line, after suggesting ``weights_only=False``)."""
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(os.fspath(path), device="cpu")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # "Unsupported global: GLOBAL a.b was not an allowed global ..." or, for a blocked module such as
        # posix, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r"unsupported global:?(?: GLOBAL)? ([\w.]+)", str(e), flags=re.IGNORECASE)
        if not found and "Weights only load failed" not in str(e):
            raise  # not a refusal: a damaged file, reported by the caller
        name = found.group(1) if found else None
        raise UnsafeCheckpointError(
            f"checkpoint {os.fspath(path)!r} holds {'a pickled ' + name if name else 'pickled Python objects'} "
            f"besides tensors, which visionzoo does not unpickle (it reads torch.load(weights_only=True)); "
            f"if you trust the file, re-save its tensors alone", name) from None


def check_weights(state_dict: dict, model: nn.Module, source: str) -> None:
    """Refuse tensors that would load silently wrong: an integer / bool tensor where the model keeps
    floating-point values (``load_state_dict`` and the filters' arithmetic would cast it), and NaN or
    infinite values. Runs on the file's own keys, before any renaming: an integer tensor is accepted
    only under a name the model's own integer entries end in (``num_batches_tracked``, index buffers)."""
    integer_names = {k.rsplit(".", 1)[-1] for k, v in model.state_dict().items() if not v.is_floating_point()}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not value.is_floating_point() and key.rsplit(".", 1)[-1] not in integer_names:
            raise WeightsError(f"checkpoint {source!r}: {key} is {value.dtype}, where the model keeps floating-point "
                             f"weights; it would be cast silently (not a float weights file?)")
        if value.is_floating_point() and value.device.type != "meta" and not torch.isfinite(value).all():
            raise WeightsError(f"checkpoint {source!r}: {key} holds NaN or infinite values (a damaged or diverged "
                             f"checkpoint)")


def select_state_dict(checkpoint: dict, use_ema: bool = False) -> dict:
    """Pick the model weights out of a training-state container (or return a bare state dict)."""
    if use_ema:
        for key in ("model_ema", "state_dict_ema"):
            if isinstance(checkpoint.get(key), dict):
                return checkpoint[key]
        raise KeyError("EMA weights requested but the checkpoint has no 'model_ema' / 'state_dict_ema' entry")
    for key in _CONTAINER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def load_checkpoint_strict(
    model: nn.Module,
    path: str | os.PathLike,
    filter_fn: Callable[[dict, nn.Module], dict],
    safe_globals: Iterable[Any] = (),
    use_ema: bool = False,
) -> None:
    """Load an official or visionzoo checkpoint file into ``model``.

    The classifier is dropped when ``model.num_classes`` differs from the checkpoint's, and the
    first convolution is adapted when ``in_chans`` differs (timm's rules). Every other key must match.
    """
    checkpoint = torch_load_restricted(path, safe_globals)
    raw = select_state_dict(checkpoint, use_ema=use_ema)
    check_weights(raw, model, os.fspath(path))
    state_dict = filter_fn(raw, model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    allowed_missing: set[str] = set()

    classifier = cfg.get("classifier")
    if classifier and f"{classifier}.weight" in state_dict:
        ckpt_classes = state_dict[f"{classifier}.weight"].shape[0]
        if getattr(model, "num_classes", ckpt_classes) != ckpt_classes:
            _logger.info("Dropping classifier %r: checkpoint has %d classes, model has %d",
                         classifier, ckpt_classes, model.num_classes)
            for suffix in ("weight", "bias"):
                state_dict.pop(f"{classifier}.{suffix}", None)
            allowed_missing = {k for k in model.state_dict() if k.startswith(classifier + ".")}

    first_conv = cfg.get("first_conv")
    in_chans = getattr(model, "in_chans", None)
    if first_conv and in_chans is not None and f"{first_conv}.weight" in state_dict:
        weight = state_dict[f"{first_conv}.weight"]
        if weight.shape[1] != in_chans:
            state_dict[f"{first_conv}.weight"] = adapt_input_conv(in_chans, weight)

    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing or result.unexpected_keys:
        def _fmt(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        raise WeightsMismatchError(
            f"checkpoint {os.fspath(path)!r} does not match {type(model).__name__}: "
            + (f"missing keys [{_fmt(missing)}]" if missing else "")
            + ("; " if missing and result.unexpected_keys else "")
            + (f"unexpected keys [{_fmt(result.unexpected_keys)}]" if result.unexpected_keys else "")
        )


def route_sources_to_load_pretrained(kwargs: dict) -> dict:
    """Make a ``pretrained_cfg_overlay`` file / URL load through the model's ``load_pretrained``.

    timm resets ``custom_load`` whenever an overlay names a weight source, which would send an
    official training-state file through timm's generic loader (it prefers ``model_ema`` and knows
    nothing of the family's allow-listed classes). The caller can still pass ``custom_load=False``.
    """
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and (overlay.get("file") or overlay.get("url")) and "custom_load" not in overlay:
        kwargs["pretrained_cfg_overlay"] = dict(overlay, custom_load=True)
    return kwargs
