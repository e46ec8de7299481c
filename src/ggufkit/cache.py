"""ggufkit's cache folders, file digests, and the one way every file is written: whole or not at all.

Atomic writes: the bytes go to a temporary file in the destination's folder (same file system, so the
rename is atomic), named `.<name>.<12 hex><TEMP_MARK>` and held under an exclusive flock while it is written.
On success the file is flushed, fsync'ed, renamed over the destination, and the folder is fsync'ed (so the
rename itself is durable). On any error, or SIGINT / SIGTERM (which arrive as exceptions while a write is
open, from the main thread), the temporary file is removed and the destination is never touched. A writer
killed with SIGKILL leaves its temporary file; the kernel drops its flock, so the next writer of the same
destination recognizes it as stale and deletes it.

    with atomic_output(path) as f:      # a buffered binary file; committed when the block ends normally
        f.write(...)
    atomic_write(path, data)            # the same for bytes already in memory

`AtomicFile` is the primitive under both, with an explicit commit() for writers that stream through the
file descriptor (gguf/writer.py).

Nothing here imports numpy, hashlib or logging at module level: every quantize run imports this module.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TEMP_MARK",
    "AtomicFile",
    "WriteInterrupted",
    "atomic_output",
    "atomic_write",
    "cache_dir",
    "fsync_dir",
    "remove_stale_temporaries",
    "sha256_file",
]

TEMP_MARK = ".ggufkit-partial"


def cache_dir(*parts: str) -> Path:
    """ggufkit's cache root (GGUFKIT_CACHE, else $XDG_CACHE_HOME/ggufkit, else ~/.cache/ggufkit)."""
    root = os.environ.get("GGUFKIT_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "ggufkit")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class WriteInterrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived while a file was being written; the partial file has been removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_as_exceptions():
    """Turn SIGTERM into an exception while writing (SIGINT already is one), so cleanup code runs.
    Only possible from the main thread; elsewhere the caller's handlers stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise WriteInterrupted(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _temp_pattern(dst: Path) -> str:
    return f".{dst.name}.*{TEMP_MARK}"


def remove_stale_temporaries(dst: str | os.PathLike) -> list[Path]:
    """Delete temporary files left in dst's folder by killed runs writing dst; returns what was removed.

    A live writer holds an exclusive flock on its temporary file; a file whose lock can be taken belongs to
    no running writer (the kernel drops the lock when the process dies, even on SIGKILL).
    """
    dst = Path(dst)
    removed = []
    for cand in dst.parent.glob(_temp_pattern(dst)):
        try:
            fd = os.open(cand, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live writer: leave it alone
            continue
        try:
            cand.unlink()
            removed.append(cand)
            import logging  # (rare: not imported on every write)

            logging.getLogger(__name__).info("removed stale temporary file %s", cand)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some file systems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary file beside `dst` that becomes `dst` on commit() and disappears on abort().

    open() removes stale temporaries of dst, then creates the temporary file (mode 0o666 less the umask)
    and locks it; `fd` is its descriptor. commit() fsyncs, closes, renames over dst and fsyncs the folder.
    abort() closes and removes the temporary file; it is safe to call at any point, more than once.
    Used as a context manager it opens, turns SIGTERM into WriteInterrupted while open, and aborts on the
    way out unless commit() was called.
    """

    def __init__(self, dst: str | os.PathLike):
        self.dst = Path(dst)
        self.fd: int | None = None
        self.temp_path: Path | None = None
        self.committed = False
        self._signals = None

    def open(self) -> int:
        remove_stale_temporaries(self.dst)
        name = f".{self.dst.name}.{os.urandom(6).hex()}{TEMP_MARK}"  # (uuid costs ~5 ms to import)
        path = self.dst.parent / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # umask applies
        self.fd, self.temp_path = fd, path
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            self.abort()
            raise
        return fd

    def commit(self) -> Path:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.temp_path, self.dst)
        self.temp_path = None
        self.committed = True
        fsync_dir(self.dst.parent)
        return self.dst

    def abort(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.temp_path is not None:
            try:
                self.temp_path.unlink()
            except FileNotFoundError:
                pass
            self.temp_path = None

    def __enter__(self) -> AtomicFile:
        self._signals = signals_as_exceptions()
        self._signals.__enter__()
        try:
            self.open()
        except BaseException:
            self._signals.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.committed:
                self.abort()
        finally:
            self._signals.__exit__(exc_type, exc, tb)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A buffered binary file whose bytes replace `path` when the block ends normally; on an exception or
    interrupt inside the block nothing is left behind and `path` keeps its old contents."""
    with AtomicFile(path) as af:
        with open(af.fd, "wb", closefd=False) as f:
            yield f
        af.commit()


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`, atomically and durably."""
    with atomic_output(path) as f:
        f.write(data)
