#!/usr/bin/env python
"""Convert an official checkpoint file into a visionzoo safetensors file.

    python tools/convert.py vim_tiny vim_t_midclstok_76p1acc.pth vim_tiny.safetensors [--ema]
    python tools/convert.py overlock_xt overlock_xt_in1k_224.pth overlock_xt.safetensors

Steps:
1. The file is looked up in ``checkpoints/manifest.yaml`` (by ``--tag``, or by the model name and the
   file's name). When the manifest knows its SHA-256 (or the hash prefix published in the file name),
   the file must match it. The file's SHA-256 is always printed, so a verified download can be added.
2. The file is read (``torch.load(weights_only=True)`` with only the classes official files pickle, or
   safetensors) and its keys are checked against the families' official layouts, so a truncated file,
   something that is not a checkpoint, or another family's checkpoint stops with one line naming the
   problem.
3. The model is built exactly as ``timm.create_model(name, pretrained=True,
   pretrained_cfg_overlay=dict(file=...))`` builds it (the family's ``checkpoint_filter_fn``, strict key
   matching), and its own state dict is written (``.safetensors``, or ``.pth``) atomically.
4. The written file is loaded back the same way with ``strict=True`` and compared tensor by tensor
   while it is still a temporary file; only a file that passes is renamed to the output name.

Every failure exits with a single ``convert: ...`` line (exit status 1), never a traceback.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch

import visionzoo  # noqa: F401
from visionzoo.cli import REPO as ROOT
from visionzoo.models import VISIONZOO_MODELS
from visionzoo.models._loading import UnsafeCheckpointError, torch_load_restricted

MANIFEST = ROOT / "checkpoints" / "manifest.yaml"
MANIFEST_FIELDS = ("family", "variant", "source", "file", "sha256", "key_format", "container", "paper_metric")

# Distinctive keys of each family's checkpoints (official and visionzoo layouts alike), checked on keys
# with any "module." / "model." / "backbone." prefix removed. "vit" is a plain ViT (DeiT / LV-ViT): the
# base weights Sparsifiner starts from.
FAMILY_KEYS: tuple[tuple[str, str], ...] = (
    ("vim", r"(^|\.)mixer\.(A_log|A_b_log|x_proj_b\.weight)$"),
    ("biformer", r"^stages\.\d+\.(blocks\.)?\d+\.attn\.lepe\."),
    ("overlock", r"^sub_blocks[34]\.\d+\.(weight_proj|dyconv_proj)\."),
    ("patnet", r"spatial_mixing\.partial_conv3\."),
    ("dependencyvit", r"^blocks\.\d+\.attn\.(head_selector|message_controller)\."),
    ("sparsifiner", r"^blocks\.\d+\.attn\.mask_predictor\."),
)
_VIT_KEYS = (r"^cls_token$", r"^blocks\.\d+\.attn\.qkv\.weight$")
_PREFIXES = ("module.", "model.", "backbone.")
_CONTAINERS = ("model", "state_dict", "module", "model_ema", "state_dict_ema")


class ConvertError(Exception):
    """A problem with the user's input: reported as one line."""


# --- manifest --------------------------------------------------------------------------------------
def load_manifest(path: Path = MANIFEST) -> dict[str, dict[str, Any]]:
    """``{tag: entry}`` from the YAML manifest, with every entry's required fields checked."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConvertError(f"cannot read the manifest {path}: {_one_line(e)}") from None
    entries = (data or {}).get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ConvertError(f"manifest {path} has no 'checkpoints' mapping")
    for tag, entry in entries.items():
        missing = [f for f in MANIFEST_FIELDS if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise ConvertError(f"manifest {path}: entry {tag!r} lacks {', '.join(missing)}")
    return entries


def find_entry(manifest: dict[str, dict[str, Any]], model: str, path: Path,
               tag: str | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """The manifest entry for ``path``: ``tag`` if given, else the ``model`` entry naming the file."""
    if tag is not None:
        if tag not in manifest:
            raise ConvertError(f"--tag {tag}: no such entry in the manifest")
        if manifest[tag]["variant"] != model:
            raise ConvertError(f"--tag {tag} is a {manifest[tag]['variant']} checkpoint, not {model}")
        return tag, manifest[tag]
    for t, entry in manifest.items():
        names = [entry.get("file")] + list(entry.get("aliases") or [])
        if entry["variant"] == model and path.name in names:
            return t, entry
    return None, None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path, digest: str, tag: str, entry: dict[str, Any]) -> bool:
    """Raise on a mismatch with the manifest; True when a checksum was checked."""
    expected = entry.get("sha256")
    if expected:
        if digest != expected.lower():
            raise ConvertError(f"{path} does not match the manifest's {tag}: sha256 {digest}, expected "
                               f"{expected.lower()} (a corrupt or different download)")
        return True
    prefix = entry.get("sha256_prefix")
    if prefix:
        if not digest.startswith(str(prefix).lower()):
            raise ConvertError(f"{path} does not match the manifest's {tag}: sha256 {digest} does not start "
                               f"with the published prefix {prefix} (a corrupt or different download)")
        return True
    return False


# --- reading and checking the file -----------------------------------------------------------------
def _safe_globals() -> list[Any]:
    """Every class an official file may pickle (the union of what the families' loaders allow)."""
    from visionzoo.models import overlock, patnet

    out: list[Any] = [argparse.Namespace]
    for extra in (overlock._CHECKPOINT_GLOBALS, patnet._CHECKPOINT_GLOBALS):
        out += [g for g in extra if g not in out]
    return out


def read_checkpoint(path: Path) -> Any:
    """Read ``path`` safely; any failure is a one-line :class:`ConvertError` (a file that pickles more
    than tensors and the allowed classes is named as such, with the object torch refused)."""
    try:
        return torch_load_restricted(path, _safe_globals())
    except UnsafeCheckpointError as e:
        raise ConvertError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - whatever the reader raises, the file is unreadable
        size = path.stat().st_size
        raise ConvertError(f"{path} is truncated or not a checkpoint ({size:,} bytes; reading it failed with "
                           f"{type(e).__name__}: {_one_line(e, 160)})") from None


def state_dict_of(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The weights in a checkpoint: unwrap training-state containers and keep the tensors."""
    if not isinstance(checkpoint, dict):
        raise ConvertError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    sd = checkpoint
    for key in _CONTAINERS:
        if isinstance(checkpoint.get(key), dict):
            sd = checkpoint[key]
            break
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConvertError(f"{path} holds no weights (top-level keys: {', '.join(map(str, list(checkpoint)[:8]))})")
    return tensors


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def detect_family(state_dict: dict[str, torch.Tensor]) -> tuple[str | None, str | None]:
    """``(family, example key)`` whose distinctive keys the state dict has, ``("vit", key)`` for a plain
    ViT, ``(None, None)`` when nothing matches."""
    keys = [_strip(k) for k in state_dict]
    for family, pattern in FAMILY_KEYS:
        rx = re.compile(pattern)
        hit = next((k for k in keys if rx.search(k)), None)
        if hit is not None:
            return family, hit
    hits = [next((k for k in keys if re.search(p, k)), None) for p in _VIT_KEYS]
    if all(hits):
        return "vit", hits[1]
    return None, None


def check_family(family_found: str | None, example: str | None, model: str, path: Path) -> None:
    family = VISIONZOO_MODELS[model].family
    if family_found is None or family_found == family or (family_found == "vit" and family == "sparsifiner"):
        return
    what = "a plain ViT (DeiT / LV-ViT)" if family_found == "vit" else f"a {family_found}"
    raise ConvertError(f"{path} holds {what} checkpoint (e.g. key {example!r}), not one for {model} "
                       f"(family {family}); pick the matching model")


# --- conversion ------------------------------------------------------------------------------------
def _one_line(e: BaseException, limit: int = 400) -> str:
    text = str(e)
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    mismatches = re.findall(r"size mismatch for ([^:]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) "
                            r"from checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))", text)
    if mismatches:
        name, got, want = mismatches[0]
        more = f" and {len(mismatches) - 1} more" if len(mismatches) > 1 else ""
        text = (f"size mismatch for {name}: {got[11:-1]} in the file, {want[11:-1]} in the model{more} "
                f"(another variant's checkpoint?)")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _build(name: str, file: Path) -> torch.nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)})


def _write(state_dict: dict[str, torch.Tensor], out: Path, metadata: dict[str, str], check) -> None:
    """Write atomically: a temporary file in the same folder (same suffix, so it loads like the output),
    ``check(tmp)``, then a rename. On any failure the temporary file is removed and ``out`` untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + out.stem + ".", suffix=".tmp" + out.suffix, dir=out.parent)
    os.close(fd)
    try:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(state_dict, tmp, metadata=metadata)
        else:
            torch.save(state_dict, tmp)
        check(Path(tmp))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert(model: str, checkpoint: str, output: str, ema: bool = False, tag: str | None = None,
            manifest: str | None = None, verify: bool = True) -> dict[str, Any]:
    """Convert ``checkpoint`` for ``model`` into ``output``; returns a summary (raises ConvertError)."""
    src, out = Path(checkpoint), Path(output)
    if model not in VISIONZOO_MODELS:
        raise ConvertError(f"unknown model {model!r}; visionzoo models: {', '.join(sorted(VISIONZOO_MODELS))}")
    if not src.is_file():
        raise ConvertError(f"{src}: no such file")
    if out.suffix not in (".safetensors", ".pth"):
        raise ConvertError(f"output {out} must end in .safetensors (or .pth)")
    if out.resolve() == src.resolve():
        raise ConvertError("output and input are the same file")
    name = f"{model}.in1k_ema" if ema else model
    if ema and name not in timm.list_pretrained(name):
        raise ConvertError(f"{model} has no EMA weights tag ({name}); drop --ema")

    digest = sha256_of(src)
    entries = load_manifest(Path(manifest) if manifest else MANIFEST)
    found_tag, entry = find_entry(entries, model, src, tag)
    checked = False
    if entry is not None and verify:
        checked = verify_checksum(src, digest, found_tag, entry)

    state_dict = state_dict_of(read_checkpoint(src), src)
    check_family(*detect_family(state_dict), model, src)
    try:
        net = _build(name, src)
    except Exception as e:  # noqa: BLE001 - key / shape mismatches and filter errors, as one line
        raise ConvertError(f"{src} does not load into {model}: {_one_line(e)}") from None

    weights = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    metadata = {"format": "pt", "visionzoo_model": model, "source_file": src.name, "source_sha256": digest}
    if found_tag:
        metadata["manifest_tag"] = found_tag

    def reloads_identically(tmp: Path) -> None:  # the written file must load the timm way, strictly
        try:
            reloaded = _build(model, tmp).state_dict()
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"the written {out} does not load back into {model}: {_one_line(e)}") from None
        differ = [k for k, v in weights.items() if k not in reloaded or not torch.equal(reloaded[k], v)]
        if differ or len(reloaded) != len(weights):
            raise ConvertError(f"the written {out} reloads with different tensors: {', '.join(differ[:5])}")

    _write(weights, out, metadata, reloads_identically)

    return {"model": model, "output": str(out), "tensors": len(weights), "values": sum(v.numel() for v in weights.values()),
                "sha256": digest, "manifest_tag": found_tag, "checksum_verified": checked,
                "manifest_has_checksum": bool(entry and (entry.get("sha256") or entry.get("sha256_prefix")))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="visionzoo model name, e.g. vim_tiny")
    p.add_argument("checkpoint", help="official checkpoint file")
    p.add_argument("output", help="output file (.safetensors, or .pth)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training-state file (Vim)")
    p.add_argument("--tag", help="manifest entry to verify against (default: found by model and file name)")
    p.add_argument("--manifest", help=f"manifest file (default {MANIFEST.relative_to(ROOT)})")
    p.add_argument("--no-verify", action="store_true", help="skip the manifest checksum check")
    args = p.parse_args(argv)
    try:
        info = convert(args.model, args.checkpoint, args.output, ema=args.ema, tag=args.tag,
                       manifest=args.manifest, verify=not args.no_verify)
    except ConvertError as e:
        raise SystemExit(f"convert: {e}") from None
    if info["checksum_verified"]:
        print(f"checksum ok ({info['manifest_tag']}): sha256 {info['sha256']}")
    elif info["manifest_tag"] and not args.no_verify:
        print(f"note: the manifest has no checksum for {info['manifest_tag']}; this file's sha256 is "
              f"{info['sha256']} (add it to checkpoints/manifest.yaml once the download is verified)")
    elif not info["manifest_tag"]:
        print(f"note: {Path(args.checkpoint).name} is not in the manifest for {args.model}; checksum not "
              f"verified (sha256 {info['sha256']}; --tag names an entry)")
    print(f"wrote {info['tensors']} tensors ({info['values']:,} values) to {info['output']}; "
          f"it loads with timm.create_model({args.model!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={info['output']!r}))")
    return info


def cli() -> None:  # visionzoo-convert: a console script would pass main's conversion summary to sys.exit
    main()
