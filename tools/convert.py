#!/usr/bin/env python
"""`python tools/convert.py`: the `visionzoo-convert` console command (visionzoo/cli/convert.py)."""
from visionzoo.cli.convert import main

if __name__ == "__main__":
    main()
