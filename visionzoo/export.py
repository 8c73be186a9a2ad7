"""Deployment export: ``torch.export`` programs (``.pt2``) and ONNX files, checked against eager.

    from visionzoo.export import export_onnx, export_program, save, check
    model = timm.create_model("vim_tiny", pretrained=True).eval()
    onnx_program = export_onnx(model, (224, 224))          # dynamic batch, opset 18
    save(onnx_program, "vim_tiny.onnx")                    # atomic: no partial file on failure
    report = check(model, "vim_tiny.onnx", (224, 224))     # onnxruntime vs eager, raises ExportError

Both formats start from one ``torch.export`` trace of the model in eval mode under ``no_grad`` with a
dynamic batch dimension (``torch.export.Dim``; the example batch is 2, so the exported file serves any
batch from 1 up). No C kernel runs while tracing (the ops' dispatch skips ctypes backends then).

``pt2``: the :class:`torch.export.ExportedProgram` as traced: visionzoo's custom ops stay in the graph
(one node each; ``import visionzoo`` registers them before ``torch.export.load``), so the loaded program
runs the same kernels as eager.

``onnx``: the trace runs with every custom op replaced by plain aten ops (``visionzoo.ops.aten_only``: the
op's reference or chunked algorithm), except the selective scans of Vim, which become torch's ``scan``
higher-order op (:mod:`visionzoo.ops.selective_scan._export`): the dynamo exporter writes that as one
ONNX ``Scan`` per layer with a small body, so the graph size does not grow with the number of tokens.
The program then goes through ``torch.onnx.export(..., dynamo=True)`` at ``opset`` (default 18).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

FORMATS = ("onnx", "pt2")
DEFAULT_OPSET = 18
TOLERANCE = 1e-4  # max |runtime - eager| / max |eager| that check() accepts
MAX_BATCH = 1024
Size = Union[int, Sequence[int]]


class ExportError(Exception):
    """An export or check that failed: the message is one line, for the command to print."""


def _hw(img_size: Size) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = (tuple(img_size) * 2)[:2] if len(img_size) == 1 else tuple(img_size)
    return int(h), int(w)


def default_img_size(model: torch.nn.Module) -> tuple[int, int]:
    """The size the model was built for (its patch embedding's ``img_size``), else the input size in its
    ``pretrained_cfg`` (224 x 224 when it has neither)."""
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        return _hw(built)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    return int(size[-2]), int(size[-1])


def example_input(model: torch.nn.Module, img_size: Size, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random ``(batch, in_chans, H, W)`` image batch (fixed seed)."""
    h, w = _hw(img_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, getattr(model, "in_chans", 3), h, w, generator=generator)


def _scan_paths() -> dict:
    """The selective scan custom ops -> their versions as one ``scan`` higher-order op (an ONNX ``Scan``)."""
    from .ops.selective_scan import _bidirectional, _op
    from .ops.selective_scan._export import selective_scan_bidirectional_scan, selective_scan_op_scan

    return {_op.selective_scan_op: selective_scan_op_scan,
            _bidirectional.selective_scan_bidirectional_op: selective_scan_bidirectional_scan}


@contextlib.contextmanager
def onnx_paths() -> Iterator[None]:
    """Within the block every visionzoo op runs as plain aten ops (``visionzoo.ops.aten_only``), the selective
    scans as one ``scan`` higher-order op each, so that a ``torch.export`` trace holds standard ops only."""
    from .ops import aten_only, decompositions
    from .ops._dispatch import register_aten_path

    scans = _scan_paths()
    previous = decompositions()
    for op, fn in scans.items():
        register_aten_path(op)(fn)
    try:
        with aten_only():
            yield
    finally:
        for op in scans:
            register_aten_path(op)(previous[op._opoverload])


def export_program(model: torch.nn.Module, img_size: Optional[Size] = None, *, dynamic_batch: bool = True,
                   aten: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model.eval()`` on ``(batch, C, H, W)`` inputs, batch dynamic (1 .. 1024) unless
    ``dynamic_batch=False`` (then batch 1). Custom ops stay as single nodes, or with ``aten=True`` are
    traced as standard ops (:func:`onnx_paths`)."""
    model = model.eval()
    img_size = img_size or default_img_size(model)
    x = example_input(model, img_size, batch=2 if dynamic_batch else 1)
    shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None
    try:
        with torch.no_grad(), (onnx_paths() if aten else contextlib.nullcontext()):
            return torch.export.export(model, (x,), dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 - reported as one line by the command
        raise ExportError(f"torch.export failed: {_one_line(e)}") from e


def export_onnx(model: torch.nn.Module, img_size: Optional[Size] = None, *, dynamic_batch: bool = True,
                opset: int = DEFAULT_OPSET) -> "torch.onnx.ONNXProgram":
    """The model as an ONNX program (dynamo exporter), every custom op in standard ONNX operators.

    Input ``image`` ``(batch, C, H, W)`` float32, output ``logits`` (the model's ``forward`` output)."""
    program = export_program(model, img_size, dynamic_batch=dynamic_batch, aten=True)
    try:
        return torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=["image"],
                                 output_names=["logits"], verbose=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX export failed: {_one_line(e)}") from e


def save(program: Any, path: Union[str, os.PathLike]) -> Path:
    """Write an ONNX program (``.onnx``, weights inside) or an ExportedProgram (``.pt2``) atomically:
    to a temporary file in the same folder, renamed into place only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        if isinstance(program, torch.export.ExportedProgram):
            torch.export.save(program, tmp)
        else:
            program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def quantize_onnx(path: Union[str, os.PathLike], out: Union[str, os.PathLike]) -> Path:
    """onnxruntime's dynamic int8 quantization of an ONNX file (int8 weights of MatMul / Gemm / Conv, activations
    quantized per call), written atomically to ``out``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp.onnx", dir=out.parent)
    os.close(fd)
    try:
        quantize_dynamic(str(path), tmp, weight_type=QuantType.QInt8)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def onnx_node_count(path: Union[str, os.PathLike]) -> int:
    """Nodes of an ONNX file, the nodes of control-flow bodies (``Scan``, ``Loop``, ``If``) included."""
    import onnx

    def count(graph) -> int:
        return sum(1 + sum(count(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
                   for node in graph.node)

    return count(onnx.load(str(path), load_external_data=False).graph)


def onnx_session(path: Union[str, os.PathLike], threads: Optional[int] = None):
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, default onnxruntime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no warnings about unused initializers
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(path: Union[str, os.PathLike], threads: Optional[int] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``image -> output`` that runs an exported file: ``.onnx`` in onnxruntime (CPU),
    ``.pt2`` as the loaded ExportedProgram's module."""
    path = Path(path)
    if path.suffix == ".onnx":
        session = onnx_session(path, threads)
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    from . import ops  # noqa: F401  (registers the custom ops the program calls)

    module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


def runtime_runner(model: torch.nn.Module, runtime: str, img_size: Optional[Size] = None,
                   threads: Optional[int] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` as ``runtime`` runs it: ``"eager"`` (the model), ``"onnxruntime"`` (exported with dynamic batch,
    a CPU session with ``threads`` intra-op threads, default torch's) or ``"export"`` (the torch.export
    program's module)."""
    if runtime == "eager":
        return model
    if runtime not in ("onnxruntime", "export"):
        raise ValueError(f"unknown runtime {runtime!r}; use eager, onnxruntime or export")
    with tempfile.TemporaryDirectory() as folder:
        if runtime == "export":
            return runner(save(export_program(model, img_size), Path(folder) / "model.pt2"))
        path = save(export_onnx(model, img_size), Path(folder) / "model.onnx")
        return runner(path, threads or torch.get_num_threads())  # the session holds the model in memory


def real_photo(model: torch.nn.Module, img_size: Size, name: str = "astronaut") -> torch.Tensor:
    """A scikit-image photo, centre-cropped, resized to ``img_size`` and normalised as the model expects."""
    from PIL import Image
    import skimage.data

    h, w = _hw(img_size)
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = Image.fromarray(np.ascontiguousarray(image[..., :3])).resize((w, h), Image.BICUBIC)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(3, 1, 1)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return ((x - mean) / std).unsqueeze(0)


def latency_ms(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, reps: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn(x)`` in ms."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@dataclass
class CheckReport:
    """What :func:`check` measured: one row per input (name, batch, max |diff|, max |eager|, relative)."""

    path: str
    rows: list = field(default_factory=list)
    runtime_ms: float = float("nan")
    eager_ms: float = float("nan")

    @property
    def worst(self) -> float:
        return max(r[4] for r in self.rows)

    def lines(self) -> list[str]:
        out = [f"  {name:>10s} batch {batch}: max|diff| {diff:.3g}, max|eager| {ref:.3g}, relative {rel:.3g}"
               for name, batch, diff, ref, rel in self.rows]
        out.append(f"  latency (batch 1): runtime {self.runtime_ms:.2f} ms, eager {self.eager_ms:.2f} ms")
        return out


def check(model: torch.nn.Module, path: Union[str, os.PathLike], img_size: Optional[Size] = None, *,
          dynamic_batch: bool = True, tolerance: float = TOLERANCE, threads: Optional[int] = None,
          reps: int = 10) -> CheckReport:
    """Run the exported file on two random inputs (batch 1 and 3 when the batch is dynamic) and a real
    photo, against ``model`` in eager mode; raise :class:`ExportError` when max |diff| exceeds
    ``tolerance * max |eager output|`` on any of them. Also times batch 1 in the runtime and in eager."""
    model = model.eval()
    img_size = img_size or default_img_size(model)
    run = runner(path, threads)
    batches = (1, 3) if dynamic_batch else (1, 1)
    inputs = [(f"random{i + 1}", example_input(model, img_size, batch=b, seed=i + 1)) for i, b in enumerate(batches)]
    inputs.append(("photo", real_photo(model, img_size)))
    report = CheckReport(str(path))
    for name, x in inputs:
        with torch.no_grad():
            ref = model(x)
        out = run(x)
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(f"{path}: output shape {tuple(out.shape)} on {name}, eager {tuple(ref.shape)}")
        diff = (out.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item()
        report.rows.append((name, x.shape[0], diff, scale, diff / max(scale, 1e-12)))
    x = inputs[0][1][:1]
    report.runtime_ms = latency_ms(run, x, reps)
    with torch.no_grad():
        report.eager_ms = latency_ms(model, x, reps)
    bad = [r for r in report.rows if not r[4] <= tolerance]
    if bad:
        name, _, diff, scale, rel = bad[0]
        raise ExportError(f"{path}: output differs from eager on {name}: max|diff| {diff:.3g} = {rel:.3g} of "
                          f"max|eager| {scale:.3g} (tolerance {tolerance:g})")
    return report


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The innermost cause of ``e`` (the exporters wrap the real error in long advice texts), as one line."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text}"[:limit]
