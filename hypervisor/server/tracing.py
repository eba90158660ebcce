"""Where the core's trace records go: a file (StartTrace, --trace) and StreamTrace readers.

The core has one `tracer` hook; this fans it out, and unhooks it when nobody listens so
untraced calls pay nothing. A StreamTrace reader has a backlog bounded in bytes,
READER_BACKLOG_BYTES; one that falls further behind is dropped with RESOURCE_EXHAUSTED rather
than holding memory without bound.
"""

import asyncio
import gzip
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO

import grpc

from hypervisor.core import Hypervisor, XenError
from hypervisor.core.abi import Errno
from hypervisor.core.trace import TraceError, TraceWriter, dumps

from .errors import Refused

READER_BACKLOG_BYTES = 16 << 20  # a second of a busy run's lines, a few hundred pages of hex


class Reader:
    """One StreamTrace caller's backlog, bounded in bytes (a line can be the record of a
    4,096-entry batch or of a page of hex, so a bound in lines bounds nothing). Falling
    further behind drops the reader: its backlog is freed and `drop` ends its stream."""

    def __init__(self, drop: Callable[[Exception], None]):
        self._lines: deque[str] = deque()
        self._bytes = 0
        self._arrived = asyncio.Event()
        self._drop = drop
        self.dropped = False

    def offer(self, line: str) -> None:
        if self.dropped:
            return
        if self._bytes + len(line) > READER_BACKLOG_BYTES:
            self._drop(
                Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"trace reader fell more than {READER_BACKLOG_BYTES >> 20} MiB behind ({len(self._lines)} lines, {self._bytes} bytes unread): "
                    "the stream ends here and the lines after it are not kept; read as fast as the calls run, or record to a file with StartTrace",
                )
            )
            self.dropped = True
            self._lines.clear()
            return
        self._lines.append(line)  # JSON lines are ASCII: a character is a byte
        self._bytes += len(line)
        self._arrived.set()

    async def next(self) -> str:
        while not self._lines:
            self._arrived.clear()
            await self._arrived.wait()
        line = self._lines.popleft()
        self._bytes -= len(line)
        return line


def open_trace(path: str, mode: str = "r") -> IO[str]:
    """A trace file as text; a name ending in .gz is gzip-compressed (a busy run traces
    tens of MB a second as plain JSON lines, about a tenth of that compressed)."""
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", compresslevel=1)
    return open(path, mode)


def read_trace(path: str) -> Iterator[str]:
    """The lines of a trace file. A compressed stream cut short (a killed server's) ends after
    its last whole line, as a plain file does; what is not a trace's text is a TraceError."""
    with open_trace(path) as lines:
        try:
            yield from lines
        except EOFError:
            return
        except UnicodeDecodeError as e:
            raise TraceError(f"not a xensim trace: byte {e.object[e.start]:#04x} is not text") from None
        except zlib.error as e:
            raise TraceError(f"the compressed stream is damaged: {e}") from None


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

    def subscribe(self, drop: Callable[[Exception], None]) -> Reader:
        """A new StreamTrace reader; `drop(exc)` ends its stream if it falls too far behind."""
        reader = Reader(drop)
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
