#!/usr/bin/env python
"""`python tools/visualize.py`: the `visionzoo-visualize` console command (visionzoo/cli/visualize.py)."""
from visionzoo.cli.visualize import main

if __name__ == "__main__":
    main()
