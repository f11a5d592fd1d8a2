"""Atomic file writes: write a temp file in the target directory, fsync, then os.replace.

An exception mid-write leaves the previous file (if any) intact and no temp file behind. A process
killed mid-write (kill -9, power loss) cannot clean up; its temp file is named
``.sftmp-<pid>-<random>-<name>`` and is removed by the next write into that folder once its process
is gone (no such pid, or a file older than the live process with that pid).

The written file gets the mode a plain ``open(path, "w")`` would give: the mode of the file it
replaces, or 0666 less the process umask for a new file (``mkstemp`` alone makes every file 0600).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import tempfile
import time

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json", "finite_for_json", "remove_stale_temp_files"]

_PREFIX = ".sftmp-"
_TEMP_NAME = re.compile(r"^\.sftmp-(\d+)-")


def _umask() -> int:
    try:  # Linux >= 4.7: read it without changing it (os.umask is process-wide, racy under threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _process_start(pid: int) -> float | None:
    """Start time of ``pid`` (seconds since the epoch), or None when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _pid_gone(pid: int) -> bool:
    """True when no process has ``pid``; a live process of another user, or a pid we cannot ask
    about, counts as present (its temp files are then judged by age)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False


def _is_stale(path: str, pid: int) -> bool:
    if _pid_gone(pid):
        return True
    started = _process_start(pid)
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    return started is not None and mtime < started - 1.0  # written before that pid's process existed


def remove_stale_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete the temp files of writes in ``directory`` whose process died; returns their paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None:
            continue
        path = os.path.join(directory, name)
        if _is_stale(path, int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed.

    The file keeps the mode of the file it replaces (a new one: 0666 less the umask).

    Example:
        >>> with atomic_path("model.safetensors", ".safetensors") as tmp:
        ...     save_file(tensors, tmp)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_files(directory)
    prefix = f"{_PREFIX}{os.getpid()}-{time.time_ns() % 10**9:09d}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=f"-{os.path.basename(path)}{suffix}"[:120], dir=directory)
    os.close(fd)
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def finite_for_json(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_for_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_for_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """Write ``obj`` as strict JSON (non-finite numbers become null, never a bare NaN token), atomically."""
    atomic_write_text(path, json.dumps(finite_for_json(obj), indent=indent, allow_nan=False))
