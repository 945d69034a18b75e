"""The log's writer: rendered lines to a stream, info and debug lines held and written in
batches, whole lines per write so that workers sharing a pipe never interleave mid-line.

Compiled with mypyc (``setup.py``): every access event passes through ``hold``.
"""

from __future__ import annotations

import asyncio
import os
import stat
from typing import Final, TextIO

#: info and debug lines reach the stream at most this late (like nginx's access_log flush=)
FLUSH_EVERY: Final = 0.5
#: ... or as soon as this many characters are held (about 130 access events): the held lines
#: stay small enough to be written while they are still in the CPU's caches
HOLD_SIZE: Final = 65536
#: the most one write(2) of held lines carries: POSIX's smallest PIPE_BUF (Linux: 4096)
ATOMIC_WRITE: Final = 4096
#: ... or where stderr is a regular file: Linux's local file systems take a write(2) whole
#: under the inode's lock whatever its size, and a shared offset moves under its own lock
FILE_WRITE: Final = 65536


def write_size(stream: TextIO) -> int:
    """The most one write of held lines carries to ``stream``: ``FILE_WRITE`` for a regular
    file, ``ATOMIC_WRITE`` for anything else (a pipe, a socket, a terminal, no file)."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return ATOMIC_WRITE
    return FILE_WRITE if stat.S_ISREG(mode) else ATOMIC_WRITE


class LineLogger:
    """Writes rendered events, one per line. Info and debug lines are held and written
    together within ``FLUSH_EVERY`` seconds (or once ``HOLD_SIZE`` is held, and at exit):
    one write per request was a fifth of the request path's cost, and one text-stream write
    per line still about 5 us. Warnings and errors are written at once, after what is held.
    structlog calls it by its level's name."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._write_size = write_size(stream)
        self._held: list[str] = []
        self._size = 0
        self._scheduled = False

    def hold(self, message: str) -> None:
        self._held.append(message)
        self._size += len(message) + 1
        if self._size >= HOLD_SIZE:
            self.flush()
            return
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (start-up, CLI): nothing would flush later
            self.flush()
            return
        self._scheduled = True
        loop.call_later(FLUSH_EVERY, self._on_timer)

    def at_once(self, message: str) -> None:
        self._held.append(message)
        self.flush()

    def _on_timer(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write what is held, in whole lines of at most ``write_size`` characters per write
        (bytes, for JSON lines: they are ASCII). Workers share stderr, and a pipe keeps a
        write of ``ATOMIC_WRITE`` in one piece (PIPE_BUF), a regular file any write, so the
        lines of two workers never interleave mid-line; a longer line goes alone."""
        held, self._held = self._held, []
        self._size = 0
        stream = self._stream
        limit = self._write_size
        chunk: list[str] = []
        size = 0
        for line in held:
            if chunk and size + len(line) >= limit:
                chunk.append("")  # the last line's end
                stream.write("\n".join(chunk))
                stream.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            chunk.append("")
            stream.write("\n".join(chunk))
        stream.flush()

    # structlog's method names: held ...
    def debug(self, message: str) -> None:
        self.hold(message)

    def info(self, message: str) -> None:
        self.hold(message)

    def msg(self, message: str) -> None:
        self.hold(message)

    def log(self, message: str) -> None:
        self.hold(message)

    # ... and written at once
    def warning(self, message: str) -> None:
        self.at_once(message)

    def warn(self, message: str) -> None:
        self.at_once(message)

    def error(self, message: str) -> None:
        self.at_once(message)

    def err(self, message: str) -> None:
        self.at_once(message)

    def critical(self, message: str) -> None:
        self.at_once(message)

    def fatal(self, message: str) -> None:
        self.at_once(message)

    def exception(self, message: str) -> None:
        self.at_once(message)

    def failure(self, message: str) -> None:
        self.at_once(message)
