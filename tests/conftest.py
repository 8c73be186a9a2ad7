import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels can only run in Triton's interpreter, and Triton reads TRITON_INTERPRET
# when it is imported (its tl.* helpers are wrapped by triton.jit then); torch imports Triton as soon as
# torch.library / visionzoo is imported, so the variable is set here, before any of that. (Importing
# torch alone does not import Triton.) Used by tests/ops/test_selective_scan_triton.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
