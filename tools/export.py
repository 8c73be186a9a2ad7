#!/usr/bin/env python
"""`python tools/export.py`: the `visionzoo-export` console command (visionzoo/cli/export.py)."""
from visionzoo.cli.export import main

if __name__ == "__main__":
    main()
