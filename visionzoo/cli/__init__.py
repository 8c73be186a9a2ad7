"""The console commands declared in pyproject's ``[project.scripts]``; ``tools/*.py`` call the same ``main``.

    visionzoo-train      visionzoo.cli.train:main       (python tools/train.py)
    visionzoo-eval       visionzoo.cli.eval:main        (python tools/eval.py)
    visionzoo-benchmark  visionzoo.cli.benchmark:cli    (python tools/benchmark.py)
    visionzoo-convert    visionzoo.cli.convert:cli      (python tools/convert.py)
    visionzoo-visualize  visionzoo.cli.visualize:cli    (python tools/visualize.py)
    visionzoo-export     visionzoo.cli.export:cli       (python tools/export.py)

Each module's ``main(argv=None)`` parses ``argv`` (default ``sys.argv[1:]``); benchmark, convert and
visualize return what they produced (rows, the conversion summary, the written paths) and their
``cli()`` drops it, since a console script passes ``main``'s return value to ``sys.exit``.

The commands read the checkout they are installed from (``pip install -e .``, README): the Hydra
configs in ``configs/``, the checkpoint manifest in ``checkpoints/``, results under ``benchmarks/``.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
