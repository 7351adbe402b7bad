"""The SSD tier's one error type and the hint it carries (what to do about it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

import rocksdict

PathLike = Union[str, Path]


class SSDTierError(RuntimeError):
    """RocksDB or the filesystem refused an SSD tier operation.

    Attributes:
        path: the DB directory (or the path that could not be created).
        op: what was being done (``open``, ``insert``, ``flush``, ...).
    """

    def __init__(self, op: str, path: PathLike, cause: object, hint: str = "") -> None:
        self.op = op
        self.path = str(path)
        hint = hint or _hint(op, str(cause))
        msg = f"SSD tier {op} failed at {self.path}: {cause}"
        super().__init__(f"{msg} ({hint})" if hint else msg)


_NOT_WRITABLE = ("not a directory", "permission denied", "read-only file", "file exists")


def _hint(op: str, msg: str) -> str:
    m = msg.lower()
    if "no space" in m or "enospc" in m or "quota" in m:
        if op == "flush":
            return (
                "the filesystem is full: rows written since the last successful flush are "
                "NOT durable, so do not commit this checkpoint; free space or move ssd.path"
            )
        return (
            "the filesystem is full: nothing of this call was stored and the caller still "
            "holds its rows; free space or point ssd.path at a larger volume"
        )
    if any(s in m for s in _NOT_WRITABLE):
        return "the SSD tier needs a writable directory: set ssd.path to one on local NVMe"
    if "corrupt" in m:  # (before "lock": "block checksum mismatch")
        return "the DB files are damaged: restore the SSD tier from the last checkpoint"
    if re.search(r"\block\b", m):
        return (
            "another process holds this DB open: two ranks with the same rank id, or a "
            "leftover process from an earlier run"
        )
    if "closed" in m:
        return "the SSD store was closed"
    return ""


def is_storage_error(e: BaseException) -> bool:
    # rocksdict raises bare ``Exception`` for RocksDB statuses and ``OSError`` for its own
    # file handling; anything else (TypeError, ...) is a bug and passes through unwrapped.
    return type(e) is Exception or isinstance(e, (OSError, rocksdict.DbClosedError))
