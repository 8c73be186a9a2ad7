"""Run timm's own ``tests/test_models.py`` over every model visionzoo registers.

timm's test file is not ours and is not vendored: pass the path of a copy (from a clone of
https://github.com/huggingface/pytorch-image-models, e.g. ``git show HEAD:tests/test_models.py >
/tmp/timm_test_models.py``). This script writes a patched copy into a temporary directory and runs
pytest there. The patch only does what timm does for its own families:

- ``list_models`` / ``list_pretrained`` in that file are narrowed to visionzoo's registered names
  (so the run covers visionzoo, not timm's 1,000+ models);
- all six families are added to ``FEAT_INTER_FILTERS`` (they implement ``forward_intermediates``);
- the plain families (Vim, DependencyViT, Sparsifiner) are added to ``NON_STD_FILTERS``, as timm
  lists its ViTs there (token outputs, no NCHW ``forward_features``);
- every family is added to ``EXCLUDE_JIT_FILTERS``: TorchScript is not supported (``torch.export``
  is the supported path), and the TorchScript tests are deselected as well.

The network tests (``test_model_inference`` and the two ``*_pretrained`` tests) are deselected; the
offline pretrained path is covered by visionzoo's ``tests/test_pretrained_offline.py``.

Usage: ``python benchmarks/run_timm_model_tests.py /tmp/timm_test_models.py [extra pytest args]``.
Results are recorded in ``benchmarks/timm_model_tests.md``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

FAMILIES = ["vim", "biformer", "overlock", "patnet", "dependencyvit", "sparsifiner"]
PLAIN = ["vim_*", "test_vim*", "dependencyvit_*", "test_dependencyvit*", "sparsifiner_*", "test_sparsifiner*"]
ALL_PATTERNS = [p for f in FAMILIES for p in (f"{f}_*", f"test_{f}*")]

_NARROW = '''
import visionzoo  # registers visionzoo's models with timm
from visionzoo.models._registry import VISIONZOO_MODELS as _VZ

def _vz_only(fn):
    def wrapped(*args, **kwargs):
        return [n for n in fn(*args, **kwargs) if n.split(".")[0] in _VZ]
    return wrapped

list_models = _vz_only(list_models)
list_pretrained = _vz_only(list_pretrained)
'''

# network tests, timm's own NaFlexViT tests, and every TorchScript test (also the FX + TorchScript one
# that names timm's regnetx_002, which the narrowed list_models no longer holds)
DESELECT = ("not test_model_inference and not test_model_load_pretrained and not test_model_features_pretrained"
            " and not naflexvit and not torchscript")


def patch(source: str) -> str:
    def replace_once(text: str, old: str, new: str) -> str:
        if text.count(old) != 1:
            sys.exit(f"run_timm_model_tests: anchor {old!r} not found once in timm's test file; update the patch")
        return text.replace(old, new)

    anchor = "from timm import list_models, list_pretrained, create_model, set_scriptable, get_pretrained_cfg_value\n"
    source = replace_once(source, anchor, anchor + _NARROW)
    source = replace_once(source, "NUM_NON_STD = len(NON_STD_FILTERS)",
                          f"FEAT_INTER_FILTERS += {FAMILIES!r}\nNON_STD_FILTERS += {PLAIN!r}\n"
                          "NUM_NON_STD = len(NON_STD_FILTERS)")
    source = replace_once(source, "TARGET_FWD_SIZE = MAX_FWD_SIZE",
                          f"EXCLUDE_JIT_FILTERS += {ALL_PATTERNS!r}\n\nTARGET_FWD_SIZE = MAX_FWD_SIZE")
    return source


def main(argv: list[str]) -> int:
    if not argv or not os.path.isfile(argv[0]):
        sys.exit("usage: python benchmarks/run_timm_model_tests.py PATH/TO/timm/tests/test_models.py [pytest args]")
    with open(argv[0], encoding="utf-8") as f:
        source = patch(f.read())
    with tempfile.TemporaryDirectory(prefix="timm_model_tests_") as tmp:
        with open(os.path.join(tmp, "test_models.py"), "w", encoding="utf-8") as f:
            f.write(source)
        # an empty ini keeps pytest from picking up visionzoo's pyproject (its -m filter and strict markers)
        open(os.path.join(tmp, "pytest.ini"), "w").close()
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not torchscript",
               "-k", DESELECT, "test_models.py", *argv[1:]]
        return subprocess.call(cmd, cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
