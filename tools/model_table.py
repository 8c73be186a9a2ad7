#!/usr/bin/env python
"""The README model table, generated from the registry (visionzoo/models/_registry.py).

    python tools/model_table.py            # print the markdown table
    python tools/model_table.py --write    # replace the table between the markers in README.md

tests/test_model_table.py fails when README.md and the registry disagree, and recounts the
parameters and GMACs of every row.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from visionzoo.models import VISIONZOO_MODELS

ROOT = Path(__file__).resolve().parents[1]

BEGIN, END = "<!-- model-table -->", "<!-- /model-table -->"


def _weights(meta) -> str:
    if not meta.weights:
        return "none released"
    return meta.weights.replace("hf:", "HF ")


def markdown_table() -> str:
    rows = [
        "| model | params | GMACs @224 | paper GMACs | paper top-1 | official code | license | official weights |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for name in sorted(VISIONZOO_MODELS, key=lambda n: (VISIONZOO_MODELS[n].family, n)):
        meta = VISIONZOO_MODELS[name]
        if meta.params is None:  # test_* variants
            continue
        origin = meta.origin_url.removeprefix("https://github.com/") if meta.origin_url else ""
        rows.append(
            f"| `{name}` | {meta.params:,} | {'–' if meta.gmacs is None else f'{meta.gmacs:.3f}'} | "
            f"{'' if meta.paper_gmacs is None else f'{meta.paper_gmacs:g}'} | "
            f"{'' if meta.paper_top1 is None else f'{meta.paper_top1:.1f}'} | "
            f"[{origin}]({meta.origin_url}) | {meta.license or ''} | {_weights(meta)} |"
        )
    return "\n".join(rows)


def readme_table(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[start:end].strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="update README.md in place")
    args = p.parse_args(argv)
    table = markdown_table()
    if args.write:
        path = ROOT / "README.md"
        text = path.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        path.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    else:
        print(table)


if __name__ == "__main__":
    main()
