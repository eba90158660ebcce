"""Where the core's trace records go: a file (StartTrace, --trace) and StreamTrace readers.

The core has one `tracer` hook; this fans it out, and unhooks it when nobody listens so
untraced calls pay nothing. A reader gets a bounded queue: one that falls behind by more than
`READER_BACKLOG` lines is cut off with RESOURCE_EXHAUSTED rather than holding memory without
bound.
"""

import asyncio
import gzip
from typing import IO

import grpc

from hypervisor.core import Hypervisor, XenError
from hypervisor.core.abi import Errno
from hypervisor.core.trace import TraceWriter, dumps

from .errors import Refused

READER_BACKLOG = 65536


class Reader:
    """One StreamTrace caller's backlog."""

    def __init__(self):
        self.lines: asyncio.Queue[str] = asyncio.Queue(READER_BACKLOG)
        self.overflowed = False

    def offer(self, line: str) -> None:
        try:
            self.lines.put_nowait(line)
        except asyncio.QueueFull:
            self.overflowed = True

    async def next(self) -> str:
        if self.overflowed and self.lines.empty():
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"trace reader fell {READER_BACKLOG} lines behind; lines were lost")
        return await self.lines.get()


def open_trace(path: str, mode: str = "r") -> IO[str]:
    """A trace file as text; a name ending in .gz is gzip-compressed (a busy run traces
    tens of MB a second as plain JSON lines, about a tenth of that compressed)."""
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", compresslevel=1)
    return open(path, mode)


class Tracing:
    def __init__(self, hv: Hypervisor):
        self.hv = hv
        self._file: IO[str] | None = None
        self._writer: TraceWriter | None = None
        self._readers: set[Reader] = set()

    def start_file(self, path: str) -> None:
        """Record to `path` from now on, replacing a file trace already running."""
        self.stop_file()
        try:
            self._file = open_trace(path, "w")
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            raise XenError(Errno.EINVAL, f"cannot create trace file {path!r}: {getattr(e, 'strerror', None) or e}") from None
        self._writer = TraceWriter(self.hv, self._file)
        self._hook()

    def stop_file(self) -> int:
        """Close the file trace (with its final state digest); returns the calls it holds."""
        if self._writer is None:
            return 0
        lines = self._writer.calls
        self._writer.close()
        self._file.close()
        self._writer = self._file = None
        self._hook()
        return lines

    def subscribe(self) -> Reader:
        reader = Reader()
        self._readers.add(reader)
        self._hook()
        return reader

    def unsubscribe(self, reader: Reader) -> None:
        self._readers.discard(reader)
        self._hook()

    def _record(self, record: dict) -> None:
        if self._writer is not None:
            self._writer(record)
        if self._readers:
            line = dumps(record)
            for reader in self._readers:
                reader.offer(line)

    def _hook(self) -> None:
        self.hv.tracer = self._record if self._writer is not None or self._readers else None

    def state(self) -> tuple[bool, int]:
        """(a file trace is running, number of StreamTrace readers), for HostInfo."""
        return self._writer is not None, len(self._readers)
