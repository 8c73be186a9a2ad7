"""The console commands declared in pyproject's ``[project.scripts]``; ``tools/*.py`` call the same ``main``.

    visionzoo-train      visionzoo.cli.train:main       (python tools/train.py)
    visionzoo-eval       visionzoo.cli.eval:main        (python tools/eval.py)
    visionzoo-benchmark  visionzoo.cli.benchmark:main   (python tools/benchmark.py)
    visionzoo-convert    visionzoo.cli.convert:main     (python tools/convert.py)
    visionzoo-visualize  visionzoo.cli.visualize:main   (python tools/visualize.py)

The commands read the checkout they are installed from (``pip install -e .``, README): the Hydra
configs in ``configs/``, the checkpoint manifest in ``checkpoints/``, results under ``benchmarks/``.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
