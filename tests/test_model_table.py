"""Verifiable metadata (torchvision-style): the README table is the registry's, and every number in
it is recounted from the model built on the meta device."""
import importlib.util
from pathlib import Path

import pytest
import timm
import torch

from visionzoo.models import VISIONZOO_MODELS
from visionzoo.utils import count_macs, count_params

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("model_table", ROOT / "tools" / "model_table.py")
model_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_table)

LISTED = sorted(n for n, m in VISIONZOO_MODELS.items() if m.params is not None)


def test_readme_table_matches_registry():
    readme = (ROOT / "README.md").read_text()
    assert model_table.readme_table(readme) == model_table.markdown_table(), (
        "README model table is stale: run `python tools/model_table.py --write`")


@pytest.mark.parametrize("name", LISTED)
def test_registry_numbers_recount(name):
    meta = VISIONZOO_MODELS[name]
    assert meta.gmacs is not None, f"{name}: GMACs missing from the registry"
    with torch.device("meta"):
        model = timm.create_model(name)
    assert count_params(model) == meta.params
    macs = count_macs(model, (1, *model.pretrained_cfg["input_size"]))
    assert abs(macs / 1e9 - meta.gmacs) < 5e-4, f"{name}: {macs / 1e9:.4f} GMACs counted, registry says {meta.gmacs}"


@pytest.mark.parametrize("name", [n for n in LISTED if VISIONZOO_MODELS[n].paper_gmacs is not None])
def test_gmacs_within_5_percent_of_the_paper(name):
    """The registry's GMACs are recounted above; here they are held to the paper's own number."""
    meta = VISIONZOO_MODELS[name]
    assert abs(meta.gmacs / meta.paper_gmacs - 1) <= 0.05, f"{name}: {meta.gmacs} GMACs vs paper {meta.paper_gmacs}"


def test_every_family_with_paper_gmacs_is_checked():
    """BiFormer and OverLoCK report per-variant FLOPs; Vim, PATNet, DependencyViT and Sparsifiner do not
    (REFERENCE.md: analytic or unverified only), so their rows leave the column empty."""
    with_paper = {m.family for m in VISIONZOO_MODELS.values() if m.paper_gmacs is not None}
    assert with_paper == {"biformer", "overlock"}
    for name, meta in VISIONZOO_MODELS.items():
        if meta.family in with_paper and meta.params is not None:
            assert meta.paper_gmacs is not None, f"{name}: paper GMACs missing"


def test_checkpoint_manifest_lists_every_weight_source():
    import yaml

    manifest = yaml.safe_load((ROOT / "checkpoints" / "manifest.yaml").read_text())["checkpoints"]
    for name in VISIONZOO_MODELS:
        for tag in timm.list_pretrained(name + ".*"):
            cfg = timm.models.get_pretrained_cfg(tag)
            if cfg and (cfg.url or cfg.hf_hub_id) and not tag.endswith("_ema"):
                assert tag in manifest, f"checkpoints/manifest.yaml lacks {tag}"
