#!/usr/bin/env python
"""`python tools/eval.py`: the `visionzoo-eval` console command (visionzoo/cli/eval.py)."""
from visionzoo.cli.eval import main

if __name__ == "__main__":
    main()
