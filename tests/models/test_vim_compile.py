"""torch.compile on Vim: one graph (fullgraph=True: no breaks around the scan and conv custom ops), same outputs."""
import pytest
import timm
import torch

import visionzoo  # noqa: F401


def _compiled_matches_eager(backend, scan_backend, monkeypatch):
    monkeypatch.setenv("VISIONZOO_BACKEND_SELECTIVE_SCAN", scan_backend)
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_backend", ["chunked", "cpu"])
def test_fullgraph_aot_eager(scan_backend, monkeypatch):
    from visionzoo.ops import is_available

    if not is_available("selective_scan", scan_backend, "cpu"):
        pytest.skip(f"scan backend {scan_backend!r} unavailable here (no C compiler)")
    _compiled_matches_eager("aot_eager", scan_backend, monkeypatch)


@pytest.mark.slow  # ~1 min of Inductor C++ compilation on 2 cores
def test_fullgraph_inductor(monkeypatch):
    _compiled_matches_eager("inductor", "chunked", monkeypatch)
