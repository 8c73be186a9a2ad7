"""Cost of Sparsifiner's default training objective: one SGD step of ``sparsifiner_deit_small`` (batch 8,
224 px, 1 thread) with attention self-distillation on (the default, 0.002) and off (0: the official
phase-2 setting, where the predictors get no gradient).

    python benchmarks/bench_sparsifiner_train_step.py 0.002   # then 0, alternating, fresh processes

Prints ``weight best_step_seconds`` (best of 3 steps after one warm-up). Results:
benchmarks/sparsifiner_train_step.md.
"""
import sys
import time

import timm
import torch

import visionzoo  # noqa: F401


def main(weight: float) -> float:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_deit_small", attn_self_distill_weight=weight).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:])


if __name__ == "__main__":
    w = float(sys.argv[1])
    print(w, round(main(w), 3))
