"""Where the core's trace records go: a file (StartTrace, --trace) and StreamTrace readers.

The core has one `tracer` hook; this fans it out, and unhooks it when nobody listens so
untraced calls pay nothing. Tracing never fails a call nor holds the event loop:

- A trace file is opened without waiting, and only a regular file (or a new one) is taken: a
  FIFO would block the open until someone read it, and a device has effects of its own.
- Records are kept in memory and reach the file in whole records, one write per flush: at
  most FLUSH_RECORDS records, FLUSH_BYTES bytes or FLUSH_INTERVAL_S seconds after their call
  (a gzip trace gets a sync flush, after which every record so far decompresses), so the file
  of a killed server replays as a prefix of its run.
- A write error (a full disk) stops the file trace, is logged in one line, and is kept for
  StopTrace, Stats and the server's exit; the calls whose records failed keep their results.
- A StreamTrace reader has a backlog bounded in bytes, READER_BACKLOG_BYTES; one that falls
  further behind is dropped with RESOURCE_EXHAUSTED.
"""

import asyncio
import gzip
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import IO, Any

import grpc

from hypervisor.core import Hypervisor, XenError
from hypervisor.core.abi import Errno
from hypervisor.core.trace import Records, TraceWriter, dumps

from .errors import Refused

log = logging.getLogger("xensim.server")

READER_BACKLOG_BYTES = 16 << 20  # a second of a busy run's lines, a few hundred pages of hex
FLUSH_RECORDS = 1024  # a burst of calls reaches the disk this many records at a time
FLUSH_BYTES = 256 << 10  # or this many bytes (records of pages written are 4 KiB each)
FLUSH_INTERVAL_S = 1.0  # and a quiet trace within a second of its last call

_SPECIAL_FILES = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFDIR: "directory", stat.S_IFSOCK: "socket"}


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


class _OwnedGzipFile(gzip.GzipFile):
    """A GzipFile that closes the file it writes to, as gzip.open's does (gzip.open itself
    cannot open without waiting)."""

    def close(self) -> None:
        file = self.fileobj
        try:
            super().close()
        finally:
            if file is not None:
                file.close()


def create_trace(path: str) -> IO[bytes]:
    """A new trace file (gzip-compressed for a name ending in .gz), opened without
    ever waiting: only a regular file or a new one is taken, checked before opening (so no
    device is opened at all) and after (O_NONBLOCK: a FIFO put there meanwhile fails at once)."""

    def opener(name: str, flags: int) -> int:
        fd = os.open(name, (flags & ~os.O_TRUNC) | os.O_NONBLOCK | os.O_NOCTTY, 0o644)
        try:
            _refuse_special(path, os.fstat(fd).st_mode)
            os.ftruncate(fd, 0)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    try:
        with suppress(FileNotFoundError):
            _refuse_special(path, os.stat(path).st_mode)
        raw = open(path, "wb", opener=opener)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise XenError(Errno.EINVAL, f"cannot create trace file {path!r}: {getattr(e, 'strerror', None) or e}") from None
    if path.endswith(".gz"):  # pages of memory written, mostly runs of a pattern, compress to a tenth or less
        return _OwnedGzipFile(fileobj=raw, mode="wb", compresslevel=1)
    return raw


def _refuse_special(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = _SPECIAL_FILES.get(stat.S_IFMT(mode), "special file")
        raise XenError(Errno.EINVAL, f"trace file {path!r} is a {kind}, not a regular file: name a regular file or a new one")


def open_trace(path: str) -> IO[bytes]:
    """A trace file to read; a name ending in .gz is gzip-compressed."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_trace(path: str) -> Iterator[tuple[int, Any]]:
    """The records of a trace file, numbered from 1 (the header), in any format replay reads
    (hypervisor.core.trace.Records): a file cut short ends after its last whole record, and
    what is not a trace is a TraceError."""
    with open_trace(path) as stream:
        yield from Records(stream)


class Tracing:
    def __init__(self, hv: Hypervisor):
        self.hv = hv
        self._file: IO[bytes] | None = None
        self._writer: TraceWriter | None = None
        self._path = ""
        self._flushed = 0  # the writer's calls at the last flush
        self._timer: asyncio.TimerHandle | None = None
        self._ended = (0, "")  # (calls, write error) of a trace a write error stopped, until StopTrace
        self._readers: set[Reader] = set()

    @property
    def write_error(self) -> str:
        """Why the file trace stopped before its StopTrace, if a write failed; "" otherwise."""
        return self._ended[1]

    def start_file(self, path: str) -> None:
        """Record to `path` from now on, replacing a file trace already running; the header
        (with a snapshot of the machine if it has run calls) is on disk when this returns."""
        self.stop_file()
        file = create_trace(path)
        try:
            writer = TraceWriter(self.hv, file)
            writer.flush()
        except OSError as e:
            with suppress(OSError):
                file.close()
            raise XenError(Errno.EINVAL, f"cannot write trace file {path!r}: {e.strerror or e}") from None
        self._file, self._writer, self._path, self._flushed = file, writer, path, 0
        self._hook()

    def stop_file(self) -> tuple[int, str]:
        """Close the file trace with its end record. Returns the calls it holds and the write
        error that stopped it early ("" if none), which is reported once, here."""
        if self._writer is not None:
            calls = self._writer.calls
            try:
                self._writer.close()
                self._file.close()
            except OSError as e:
                self._stop(e)
            else:
                self._ended = (calls, "")
                self._release()
        ended, self._ended = self._ended, (0, "")
        return ended

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
            try:
                self._writer(record)
                if self._writer.calls - self._flushed >= FLUSH_RECORDS or self._writer.kept_bytes >= FLUSH_BYTES:
                    self._flush()
                elif self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self._flush_late)
            except OSError as e:
                self._stop(e)
        if self._readers:
            line = dumps(record)
            for reader in self._readers:
                reader.offer(line)

    def _flush(self) -> None:
        """Everything recorded so far to the file, in whole records (each flush comes between two)."""
        self._writer.flush()
        self._flushed = self._writer.calls
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush_late(self) -> None:
        self._timer = None
        try:
            self._flush()
        except OSError as e:
            self._stop(e)

    def _stop(self, error: OSError) -> None:
        """A write failed: the trace ends here, the calls go on."""
        calls = self._writer.calls
        message = f"the trace to {self._path} stopped after {calls} calls: {error.strerror or error}; later calls ran untraced"
        log.error("%s", message)
        self._ended = (calls, message)
        with suppress(OSError):
            self._file.close()
        self._release()

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._file = self._writer = self._timer = None
        self._hook()

    def _hook(self) -> None:
        self.hv.tracer = self._record if self._writer is not None or self._readers else None

    def state(self) -> tuple[bool, int]:
        """(a file trace is running, number of StreamTrace readers), for HostInfo."""
        return self._writer is not None, len(self._readers)
