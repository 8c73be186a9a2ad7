#!/usr/bin/env python
"""`python tools/train.py`: the `visionzoo-train` console command (visionzoo/cli/train.py)."""
from visionzoo.cli.train import main

if __name__ == "__main__":
    main()
