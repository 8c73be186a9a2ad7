"""``timm.create_model(name, pretrained=True)`` through timm's own download code, offline.

Each test fills a temporary Hugging Face cache (the hub's layout: ``models--org--name/blobs/<sha>``,
``snapshots/<rev>/<file>`` linking to the blob, ``refs/main``) and torch hub's ``checkpoints`` folder
with official-format files made from random weights, then loads every tag that has a hub id or a URL
with ``HF_HUB_OFFLINE`` on and sockets refused: no test can reach the network, and a cache miss fails.

The smallest variant of each family is built at its real size. The other tags load the same way
(same repository / URL, file name, container, key layout and tag rules such as ``_ema``) into a
narrower copy of their architecture (``SHRINK``), which keeps the test fast.
"""
import argparse
import hashlib
import os
import socket
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import timm
import torch

import visionzoo  # noqa: F401
from visionzoo.models import VISIONZOO_MODELS

from .models.overlock_official import to_official as overlock_to_official
from .models.test_biformer import _to_official as biformer_to_official
from .models.test_vim import _to_official as vim_to_official
from .test_convert_visualize import _randomised

REAL = {"vim_tiny", "biformer_tiny", "overlock_xt", "sparsifiner_deit_small"}
SHRINK = {
    "vim": dict(embed_dim=64, depth=2),
    "biformer": dict(depths=(1, 1, 1, 1), dims=(32, 64, 96, 128)),
    "overlock": dict(depths=(1, 1, 1, 1), sub_depths=(1, 1), dims=(16, 24, 32, 48), num_groups=(4, 4), projection=64),
    "sparsifiner": dict(embed_dim=64, depth=2, num_heads=2),
}


def _hub_tags():
    """Every visionzoo pretrained tag with a Hugging Face hub id or a URL."""
    tags = []
    for name in timm.list_pretrained():
        if name.split(".")[0] in VISIONZOO_MODELS:
            cfg = timm.models.get_pretrained_cfg(name)
            if cfg.hf_hub_id or cfg.url:
                tags.append(name)
    return tags


TAGS = _hub_tags()


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty HF and torch hub caches, offline mode, and no sockets."""
    hf, torch_home = tmp_path / "hf", tmp_path / "torch"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def refuse(*args, **kwargs):
        raise AssertionError("a pretrained load tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return hf, torch_home / "hub" / "checkpoints"


def _put_hf(hf: Path, repo_id: str, filename: str, obj) -> None:
    """Store ``obj`` as ``filename`` of ``repo_id`` in the hub's cache layout (revision ``main``)."""
    repo = hf / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    tmp = repo / "blobs" / "incoming"
    torch.save(obj, tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    blob = repo / "blobs" / sha
    os.replace(tmp, blob)
    rev = hashlib.sha1(repo_id.encode()).hexdigest()  # a commit hash
    snap = repo / "snapshots" / rev / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    if snap.exists():
        snap.unlink()
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)


def _arch(tag):
    variant = tag.split(".")[0]
    return {} if variant in REAL else SHRINK[VISIONZOO_MODELS[variant].family]


def _same(loaded: torch.nn.Module, expected: dict) -> None:
    sd = loaded.state_dict()
    assert set(sd) == set(expected), set(sd) ^ set(expected)
    for k, v in sd.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-5, msg=k)


def test_every_hub_family_is_covered():
    families = {VISIONZOO_MODELS[t.split(".")[0]].family for t in TAGS}
    assert families == {"vim", "biformer", "overlock", "sparsifiner"}  # PATNet, DependencyViT: no weights
    assert {"vim_tiny.in1k", "biformer_tiny.in1k", "overlock_xt.in1k"} <= set(TAGS)


def test_vim_tags_load_from_the_hf_cache(caches):
    """The official training states ({"model", "model_ema", "args", ...}) from the hub repos."""
    hf, _ = caches
    tags = [t for t in TAGS if t.startswith("vim_")]
    files = {}  # (repo, file) -> (model weights, EMA weights) of one randomised source
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag)
        key = (cfg.hf_hub_id, cfg.hf_hub_filename)
        if key not in files:
            variant = tag.split(".")[0]
            src, ema = _randomised(variant, **_arch(tag)), _randomised(variant, seed=1, **_arch(tag))
            _put_hf(hf, *key, {"model": vim_to_official(src.state_dict()), "model_ema": vim_to_official(ema.state_dict()),
                              "optimizer": {}, "epoch": 299, "args": argparse.Namespace(model=variant)})
            files[key] = (src.state_dict(), ema.state_dict())
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag)
        model_sd, ema_sd = files[(cfg.hf_hub_id, cfg.hf_hub_filename)]
        model = timm.create_model(tag, pretrained=True, **_arch(tag))
        _same(model, ema_sd if tag.endswith("_ema") else model_sd)


def test_biformer_and_overlock_tags_load_from_the_torch_hub_cache(caches):
    """BiFormer's OneDrive files are cached as ``<variant>_in1k.pth`` (the official name; the links all
    end in ``/root/content``); OverLoCK's release files (training form, folded on load) under their names."""
    _, checkpoints = caches
    checkpoints.mkdir(parents=True)
    expected = {}
    for tag in [t for t in TAGS if t.startswith(("biformer_", "overlock_"))]:
        variant = tag.split(".")[0]
        if variant.startswith("biformer_"):
            src = _randomised(variant, **_arch(tag))
            layout = "stl" if variant == "biformer_stl" else "biformer"
            obj = {"model": biformer_to_official(src.state_dict(), layout), "epoch": 299}
            name = f"{variant}_in1k.pth"
        else:  # the release's training form: unfolded dilated branches, the aux head
            src = _randomised(variant, deploy=False, use_aux_head=True, **_arch(tag))
            obj = {"model": overlock_to_official(src.state_dict())}
            name = Path(timm.models.get_pretrained_cfg(tag).url).name
            src.reparameterize()
            src.aux_head = None
        torch.save(obj, checkpoints / name)
        expected[tag] = src.state_dict()
    assert not (checkpoints / "content").exists()
    for tag, sd in expected.items():
        _same(timm.create_model(tag, pretrained=True, **_arch(tag)), sd)
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(  # nothing else was written there
        [f"{t.split('.')[0]}_in1k.pth" for t in expected if t.startswith("biformer_")]
        + [Path(timm.models.get_pretrained_cfg(t).url).name for t in expected if t.startswith("overlock_")])


def test_sparsifiner_backbone_tags_load_from_the_torch_hub_cache(caches):
    """The DeiT-S ({"model": ...}) and LV-ViT-S (flat) files the recipe starts from; the predictors keep
    their fresh init."""
    _, checkpoints = caches
    checkpoints.mkdir(parents=True)
    for tag in [t for t in TAGS if t.startswith("sparsifiner_")]:
        variant = tag.split(".")[0]
        src = _randomised(variant, **_arch(tag))
        backbone = {k: v for k, v in src.state_dict().items() if ".mask_predictor." not in k}
        url = timm.models.get_pretrained_cfg(tag).url
        torch.save({"model": backbone} if "deit" in variant else backbone, checkpoints / Path(url).name)
        model = timm.create_model(tag, pretrained=True, **_arch(tag))
        sd = model.state_dict()
        for k, v in backbone.items():
            torch.testing.assert_close(sd[k], v, msg=k)


def test_a_cache_miss_fails_without_the_network(caches):
    with pytest.raises(Exception) as info:
        timm.create_model("vim_tiny", pretrained=True)
    assert "network" not in str(info.value)  # the offline refusal, not the socket guard
