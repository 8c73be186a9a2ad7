"""The one error type for bad user input (paths, files, annotations, model names).

Its message is a single line that names the problem and the file (or the name) at fault; the tools
print it as ``error: <message>`` and exit with status 2 instead of a traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: wrong path, corrupt or inconsistent annotation, wrong image channels, unknown name."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
