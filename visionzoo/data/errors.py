"""The one error type for bad user input (paths, files, annotations, model names).

Its message is a single line that names the problem and the file (or the name) at fault; the tools
print it as ``error: <message>`` and exit with status 2 instead of a traceback.

An ``InputError`` raised in a ``DataLoader`` worker process reaches the main process re-built by torch
from ``"Caught InputError in DataLoader worker process N. Original Traceback ..."`` (the worker's whole
traceback as the message); the worker's own one-line message is taken back out of it.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: wrong path, corrupt or inconsistent annotation, wrong image channels, unknown name."""

    def __init__(self, message: str):
        text = str(message)
        if "\nOriginal Traceback" in text:  # re-raised from a DataLoader worker (torch's ExceptionWrapper)
            last = text.rstrip().splitlines()[-1]  # "visionzoo.data.errors.InputError: <the worker's message>"
            text = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(" ".join(text.split()))  # always one line
