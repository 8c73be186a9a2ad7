#!/usr/bin/env python
"""`python tools/benchmark.py`: the `visionzoo-benchmark` console command (visionzoo/cli/benchmark.py)."""
from visionzoo.cli.benchmark import main

if __name__ == "__main__":
    main()
