"""Writing files so that a reader (or a resumed run) never sees a half-written one, and a crash leaves no litter.

Every write goes to a temporary name unique to this host and process, is flushed and fsynced, renamed over the
final name, and the folder is fsynced so the rename itself survives a power loss. On failure the temporary file is
removed. `SafetensorsWriter` writes one safetensors file tensor by tensor, so that a process never holds every
tensor of the file at once (the resume state and the ledger of a large model are written layer by layer).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
from collections.abc import Iterable

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def temporary_name(path: str) -> str:
    """A sibling of `path` no other host, process or call uses (a shared run dir may be written from several)."""
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:40]
    return f"{path}.tmp-{host}-{os.getpid()}-{secrets.token_hex(4)}"


def fsync_folder(folder: str) -> None:
    """Make the renames inside `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: str, path: str) -> None:
    os.replace(tmp, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_atomic(path: str, data: str | bytes) -> str:
    """Write `data` to `path` through a fsynced temporary file and `os.replace`; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def write_json_atomic(path: str, obj, indent: int | None = 1) -> str:
    return write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class SafetensorsWriter:
    """Writes one safetensors file a tensor at a time; the file appears (atomically, fsynced) at `close()`.

    With `specs` (name → (dtype, shape), in the order the tensors will come) the header is written first and each
    tensor streams straight into the file. Without, each tensor is appended to a temporary data file and the header
    (which needs every size) is written at `close()`, followed by that data. Either way the writer holds one tensor
    at a time. Use it as a context manager: an exception removes every temporary file and leaves `path` as it was.
    """

    def __init__(self, path: str, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]] | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tmp = temporary_name(path)
        self._entries: list[tuple[str, str, list[int], int]] = []  # name, dtype, shape, bytes
        self._declared = None if specs is None else [(n, _dtype_name(d), list(s)) for n, d, s in specs]
        self._spill = None if specs is not None else temporary_name(path + ".data")
        self._written = 0
        self._metadata: dict[str, str] | None = None
        # declared: the header goes first, written at the first tensor (the metadata can change until then)
        self._file = open(self._tmp if specs is not None else self._spill, "wb")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """The file's `__metadata__` (strings only). With declared specs, call it before the first tensor."""
        if self._declared is not None and self._written:
            raise RuntimeError("the metadata of a streamed safetensors file must be set before its first tensor")
        self._metadata = {str(k): str(v) for k, v in metadata.items()}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        data = _tensor_bytes(tensor)
        entry = (name, _dtype_name(tensor.dtype), list(tensor.shape), len(data))
        if self._declared is not None:
            index = len(self._entries)
            if index >= len(self._declared) or self._declared[index] != entry[:3]:
                expected = self._declared[index] if index < len(self._declared) else "nothing more"
                raise ValueError(f"tensor {entry[:3]} does not match the declared {expected}")
            if index == 0:
                self._file.write(_header(self._declared, self._metadata))
        self._file.write(data)
        self._entries.append(entry)
        self._written += 1

    def close(self) -> str:
        """Finish the file and move it into place; returns its path."""
        try:
            if self._declared is not None:
                if len(self._entries) != len(self._declared):
                    raise ValueError(f"{len(self._entries)} of {len(self._declared)} declared tensors were written")
                if not self._entries:
                    self._file.write(_header([], self._metadata))
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            else:
                self._file.close()
                with open(self._tmp, "wb") as out, open(self._spill, "rb") as data:
                    out.write(_header([e[:3] for e in self._entries], self._metadata, [e[3] for e in self._entries]))
                    for chunk in iter(lambda: data.read(1 << 24), b""):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                _remove_quietly(self._spill)
            _commit(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Remove every temporary file; `path` is left as it was."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        _remove_quietly(self._tmp)
        if self._spill is not None:
            _remove_quietly(self._spill)


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"safetensors cannot hold {dtype}")
    return SAFETENSORS_DTYPES[dtype]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _nbytes(dtype: str, shape: list[int]) -> int:
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
    count = 1
    for dim in shape:
        count *= dim
    return size * count


def _header(entries, metadata: dict[str, str] | None, sizes: list[int] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for i, (name, dtype, shape) in enumerate(entries):
        size = sizes[i] if sizes is not None else _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format allows trailing spaces; 8-byte aligned data
    return struct.pack("<Q", len(encoded)) + encoded
