"""Sparsifiner in onnxruntime vs eager: relative logit difference per seed and input, and where the two runtimes'
key selections first diverge (issue 17's parity bar; benchmarks/export_cpu.md, Sparsifiner section).

For each seed the model is built by default (``torch.manual_seed(seed)``, random init), exported with
``visionzoo.export.export_onnx`` (default settings, dynamic batch), and run on ``check()``'s inputs: random1
(batch 1), random2 (batch 3, the same file) and the astronaut photo. The ONNX graph gets its selection
intermediates as extra outputs (per block: the coefficient logits, the kept coefficients, the key scores,
the kept keys); the eager side records the same tensors. Reported per input: max |ORT - eager| / max |eager|,
and at the first block where a kept set differs, the stage (coefficients or keys), the number of rows that
differ and, for the first such row, the eager gap at the cut (k-th minus (k+1)-th largest value) of the
logits and of their fp32 softmax (coefficients) or of the key scores.

    OMP_NUM_THREADS=1 python benchmarks/bench_sparsifiner_export_ties.py --seeds 0 1 2 3 4 5 6 7 8 9
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def selection_outputs(path: str):
    """The ONNX model with, per block, (logits, coefficient indices, key scores, key indices) as extra outputs."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    tops = [n for n in graph.node if n.op_type == "TopK"
            and any(a.name == "largest" and a.i == 1 for a in n.attribute)]
    if len(tops) % 2:
        raise SystemExit(f"{path}: expected a coefficient and a key TopK per block (no token pruning), found {len(tops)}")
    blocks = [(c.input[0], c.output[1], k.input[0], k.output[1]) for c, k in zip(tops[::2], tops[1::2])]
    for name in (v for b in blocks for v in b):
        graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model.SerializeToString(), blocks


def record_eager(store: list):
    """Patch the predictor so each block appends its logits, kept coefficients, key scores and kept keys."""
    import torch.nn.functional as F
    import visionzoo.models.sparsifiner as S

    kept, keys = S.MaskPredictor.kept_coefficients, S.sparsifiner_keys

    def kept_coefficients(self, q, k, grid, token_index=None):
        proj_n, _ = self.token_params(grid, token_index)
        logits = ((self.proj_c_q(q) @ (self.proj_c_k(k).transpose(-2, -1) @ proj_n)) * self.scale)[..., 1:, :]
        out = kept(self, q, k, grid, token_index)
        store.append(dict(logits=logits, coef=out[0]))
        return out

    def sparsifiner_keys(cols, weights, table, budget, backend="auto"):
        T = cols.shape[-1]
        scores = F.embedding_bag(cols.reshape(-1, T), table, per_sample_weights=weights.reshape(-1, T), mode="sum")
        out = keys(cols, weights, table, budget, backend=backend)
        store[-1].update(scores=scores.view(*cols.shape[:-1], table.shape[-1]), keys=out)
        return out

    S.MaskPredictor.kept_coefficients, S.sparsifiner_keys = kept_coefficients, sparsifiner_keys


def gap_at(values: torch.Tensor, k: int, row) -> float:
    s = values[tuple(row)].sort(descending=True).values
    return (s[k - 1] - s[k]).item()


def first_divergence(blocks, outs, eager) -> str:
    for i, (names, e) in enumerate(zip(blocks, eager)):
        o = {n: torch.from_numpy(v) for n, v in zip(("logits", "coef", "scores", "keys"), (outs[n] for n in names))}
        for stage in ("coef", "keys"):
            diff = (o[stage].sort(-1).values != e[stage].sort(-1).values).any(-1)
            if diff.any():
                row = diff.nonzero()[0].tolist()
                k = e[stage].shape[-1]
                if stage == "coef":
                    gaps = (f"eager gap at the cut: logits {gap_at(e['logits'], k, row):.1e}, fp32 softmax "
                            f"{gap_at(e['logits'].softmax(-1), k, row):.1e}")
                else:
                    gaps = f"eager gap at the cut: key scores {gap_at(e['scores'], k, row):.1e}"
                what = "coefficient" if stage == "coef" else "key"
                return f"block {i}: {int(diff.sum())} row(s) with other {what}s; row {row}: {gaps}"
    return "no selection differs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sparsifiner_deit_small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()

    import onnxruntime as ort
    import timm

    import visionzoo  # noqa: F401
    from visionzoo.export import example_input, export_onnx, real_photo, save

    eager: list = []
    record_eager(eager)
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = timm.create_model(args.model).eval()
        size = model.pretrained_cfg["input_size"][1:]
        with tempfile.TemporaryDirectory() as folder:
            path = str(save(export_onnx(model), Path(folder) / "model.onnx"))
            data, blocks = selection_outputs(path)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        inputs = [("random1", example_input(model, size, 1, 1)), ("random2", example_input(model, size, 3, 2)),
                  ("photo", real_photo(model, size))]
        for name, x in inputs:
            eager.clear()
            with torch.no_grad():
                ref = model(x)
            outs = dict(zip(names, session.run(None, {"image": x.numpy()})))
            rel = (np.abs(outs[names[0]] - ref.numpy()).max() / ref.abs().max()).item()
            print(f"seed {seed} {name:8s} batch {x.shape[0]}: relative {rel:.1e}  {first_divergence(blocks, outs, eager)}",
                  flush=True)


if __name__ == "__main__":
    main()
