"""The one atomic writer: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import json
import os


def write_atomic(path: str, data: str | bytes) -> str:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`; returns `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    if isinstance(data, bytes):
        with open(tmp, "wb") as f:
            f.write(data)
    else:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(data)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str, obj, indent: int | None = 1) -> str:
    return write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
