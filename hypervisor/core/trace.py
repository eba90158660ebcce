"""Trace and replay: every call as one record; replaying them into a core reproduces the run.

The core is deterministic, so a trace is a complete recording of a run: a header naming the
machine the run starts from, one record per hypercall or toolstack op with its caller,
arguments and result or error, and an end record with the final state digest. `replay`
re-executes it, reports every result that differs, and with the end record checks the final
state too.

Format 3 (docs/trace.md, "The format"): the header is a line of JSON, and each record after it
a frame, a 4-byte length and a pickle of plain values (dicts, lists, tuples, ints, strings,
bytes) that names no class, so memory written is stored as its bytes, not as hex. What replay
computes again is not stored: the memory contents a call returns (read) are recorded as their
length and CRC-32, which replay checks against the contents it reads. Formats 1 and 2, JSON
lines with bytes as {"hex": "..."}, are still read.

A hypercall that stopped at a preemption point has the result {"continuation": {where it
stopped}}; each time it goes on is a record of its own with "resume" (where it went on) in
place of "args", as Xen's re-issued hypercall is a call of its own. The core parks the continuation
on its vCPU (Vcpu.continuation) until it goes on, so a snapshot holds the calls in progress
too. The header names the work budget, so that a replay stops at the same points.

The header gives the starting machine by its size when the trace starts before any call (a
fresh core), and otherwise carries a snapshot of the whole core (`snapshot`), so a trace started
mid-run replays as well. Any prefix of a trace replays as the run so far: a writer that stopped
(a killed server, a full disk) leaves whole records and at most one last record cut short, which
replay skips; without the end record the final state is not compared.
"""

import base64
import hashlib
import inspect
import io
import json
import pickle
import struct
import types
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any

import numpy as np

from .abi import PREEMPT_WORK
from .errors import XenError
from .frames import PARTIAL, VALIDATED
from .hypervisor import Hypervisor, error_result
from .preempt import Continuation
from .sched import PERIODIC_TIMER
from .schedop import POLL_TIMER, SINGLESHOT_TIMER

# 3: framed binary records, memory read back stored as a checksum; 2: JSON lines whose header
# may carry a snapshot; 1: JSON lines, never a snapshot. Formats 1 and 2 replay the same way.
FORMAT = 3
READABLE_FORMATS = (1, 2, FORMAT)
_LENGTH = struct.Struct("<I")  # a format 3 record's frame: its length, then its pickle
MAX_RECORD = 1 << 28  # no record of a run comes near this: a longer frame is damage, not a record


class TraceError(ValueError):
    """Input that replay cannot use as a trace; the message names the record and says why."""


# -- JSON (formats 1 and 2, and StreamTrace's lines) -----------------------------------------


def _encode(value):
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, Continuation):
        return {"continuation": value.summary()}
    raise TypeError(f"cannot trace a {type(value).__name__}")


def _decode(obj: dict):
    if obj.keys() == {"hex"}:
        return bytes.fromhex(obj["hex"])
    return obj


def dumps(record: dict) -> str:
    return json.dumps(record, default=_encode, separators=(",", ":"))


def loads(line: str) -> dict:
    return json.loads(line, object_hook=_decode)


# -- format 3 records ------------------------------------------------------------------------


class _NotPlain(Exception):
    pass


class _RecordPickler(pickle.Pickler):
    """Pickles plain values only. Pickle calls `reducer_override` for nothing but values of
    other types, so plain records pay nothing for the check, and a record holding anything
    else (an IntEnum, a Continuation) is made plain first (`_plain`)."""

    def reducer_override(self, obj):
        raise _NotPlain


class _RecordUnpickler(pickle.Unpickler):
    """Loads a record's pickle, which names no class or function: one that does is damage
    (or a crafted file), and loads nothing that could run code."""

    def find_class(self, module: str, name: str):
        raise TraceError(f"it names {module}.{name}; a record holds plain values only")


_ATOMS = frozenset({int, str, bool, float, type(None)})
# The calls whose results may hold memory contents (bytes): a read, alone or in a multicall.
# Only their results are searched for bytes; any other result is stored as it is.
_RETURNS_MEMORY = frozenset({"read", "multicall"})


def _digested(result: Any) -> Any:
    """A call's result as a trace records it: the memory contents it returns (bytes) as
    {"crc32", "len"}, which replay recomputes and checks instead of storing them. A result
    of atoms only (most are: {}, {"old": n}) is returned as it is."""
    cls = result.__class__
    if cls in _ATOMS:
        return result
    if cls is dict:
        for value in result.values():
            if value.__class__ not in _ATOMS:
                return {k: _digested(v) for k, v in result.items()}
        return result
    if cls is list or cls is tuple:
        return [_digested(v) for v in result]
    if cls is bytes or cls is bytearray:
        return {"crc32": zlib.crc32(result), "len": len(result)}
    return result  # made plain by _plain, if the pickler meets it


def _plain(value: Any) -> Any:
    """`value` as plain values: a Continuation as {"continuation": where it stopped}, an enum
    as its value, a tuple as a list."""
    cls = value.__class__
    if cls is dict:
        return {k: _plain(v) for k, v in value.items()}
    if cls is list or cls is tuple:
        return [_plain(v) for v in value]
    if cls is Continuation:
        return {"continuation": value.summary()}
    if isinstance(value, Enum):
        return value.value
    if cls in _ATOMS or cls is bytes or cls is bytearray:
        return value
    raise TypeError(f"cannot trace a {cls.__name__}")


def outcome(record: dict) -> dict:
    """A call record's outcome as a format 3 trace holds it: {"result": ...} or {"error": ...}."""
    if "error" in record:
        return {"error": _plain(record["error"])}
    return {"result": _plain(_digested(record.get("result")))}


class _Framer:
    """Frames records for a format 3 trace, with one pickler reused for every record."""

    def __init__(self):
        self._out = io.BytesIO()
        self._pickler = _RecordPickler(self._out, protocol=5)

    def __call__(self, record: dict) -> tuple[bytes, bytes]:
        """The record's frame, in two parts: its length, and its pickle."""
        if record.get("op") in _RETURNS_MEMORY and "result" in record:
            record = {**record, "result": _digested(record["result"])}
        out = self._out
        out.seek(0)
        out.truncate()
        self._pickler.clear_memo()
        try:
            self._pickler.dump(record)
        except _NotPlain:
            out.seek(0)
            out.truncate()
            self._pickler.clear_memo()
            self._pickler.dump(_plain(record))
        body = out.getvalue()
        return _LENGTH.pack(len(body)), body


def frame(record: dict) -> bytes:
    """One record of a format 3 trace: its length, then its pickle."""
    return b"".join(_Framer()(record))


class TraceWriter:
    """Attach to `hv.tracer`. The header is written at once; each call's record is kept
    until `flush`, which writes the records so far in one piece (so the stream gets whole
    records, and one write per burst rather than per call)."""

    def __init__(self, hv: Hypervisor, out: IO[bytes]):
        self.hv = hv
        self.out = out
        self.calls = 0
        self.kept_bytes = 0  # of the records not yet written
        self._kept: list[bytes] = []
        self._frame = _Framer()
        header = {"xensim_trace": FORMAT, "nr_frames": hv.nr_frames, "strict_tlb": hv.strict_tlb, "preempt_work": hv.budget.per_call}
        if hv.stats:  # every call is counted there: this machine is no longer a fresh one
            header["snapshot"] = snapshot(hv)
        out.write(json.dumps(header, separators=(",", ":")).encode("ascii") + b"\n")

    def __call__(self, record: dict) -> None:
        length, body = self._frame(record)
        self._kept += (length, body)
        self.kept_bytes += len(body)
        self.calls += 1

    def flush(self) -> None:
        """Write the records kept so far, and flush the stream."""
        kept, self._kept, self.kept_bytes = self._kept, [], 0
        if kept:
            self.out.write(b"".join(kept))
        self.out.flush()

    def close(self) -> None:
        """Write the end record, the final state digest, so a replay can check the state it ends in."""
        self._kept += self._frame({"digest": state_digest(self.hv)})
        self.flush()


# -- snapshots ------------------------------------------------------------------------------

# What a snapshot may name besides the core's own classes and functions: how numpy and
# collections pickle their objects (numpy 2 spells its modules numpy._core, numpy 1 numpy.core).
_PICKLED_LIBRARY = {
    ("collections", "Counter"),
    ("collections", "deque"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    *((f"numpy.{core}.{module}", name) for core in ("_core", "core") for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))),
}


_CORE = __name__.rpartition(".")[0] + "."  # "hypervisor.core."


def _of_the_core(obj: object) -> bool:
    return (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith(_CORE)


class _Pickler(pickle.Pickler):
    """Pickles the core. The tracer (the adapter's, whatever it holds) is left out, and the
    hooks one core object keeps to another's method (FrameTable.promote, ...) go by name."""

    def __init__(self, file, tracer):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tracer = tracer

    def persistent_id(self, obj):
        if obj is self.tracer and obj is not None:
            return ("tracer",)
        if isinstance(obj, types.MethodType):
            return ("method", obj.__self__, obj.__func__.__name__)
        return None


class _Unpickler(pickle.Unpickler):
    """Loads a snapshot, naming nothing but the core's own classes and functions and
    `_PICKLED_LIBRARY`: a crafted trace can build core objects and arrays, and run nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLED_LIBRARY:
            return super().find_class(module, name)
        if module.startswith(_CORE) and "." not in name:
            obj = super().find_class(module, name)
            if _of_the_core(obj):
                return obj
        raise TraceError(f"the snapshot names {module}.{name}, which is not part of the core")

    def persistent_load(self, pid):
        match pid:
            case ("tracer",):
                return None
            case ("method", owner, str(name)) if _of_the_core(type(owner)) and inspect.isfunction(getattr(type(owner), name, None)):
                return getattr(owner, name)
        raise TraceError(f"the snapshot names {pid!r}, which is not a method of the core")


class _Deflate:
    """A file for the pickler that keeps what it is given compressed (a machine's frame table
    is mostly runs of the same value; its memory is stored sparsely already)."""

    def __init__(self):
        self._zlib = zlib.compressobj(1)
        self._parts: list[bytes] = []

    def write(self, data) -> None:
        self._parts.append(self._zlib.compress(data))

    def getvalue(self) -> bytes:
        return b"".join(self._parts) + self._zlib.flush()


def snapshot(hv: Hypervisor) -> str:
    """The whole core as text for a trace header: its objects pickled (so nothing is left out,
    whatever state the core grows), compressed, in base64. `restore` loads it."""
    out = _Deflate()
    _Pickler(out, hv.tracer).dump(hv)
    return base64.b64encode(out.getvalue()).decode("ascii")


def restore(text: str) -> Hypervisor:
    """The core a `snapshot` holds, untraced."""
    try:
        hv = _Unpickler(io.BytesIO(zlib.decompress(base64.b64decode(text, validate=True)))).load()
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged snapshot makes pickle raise
        raise TraceError(f"the snapshot does not load: {type(e).__name__}: {e}") from None
    if not isinstance(hv, Hypervisor):
        raise TraceError(f"the snapshot holds a {type(hv).__name__}, not a machine")
    return hv


def state_digest(hv: Hypervisor) -> str:
    """A hash of everything the model holds: frame table, M2P, memory, domains and their
    port tables, vCPUs with their TLBs, timers, scheduler state and old_guest_tables, partial
    tables' progress, the clock. Not a vCPU's parked continuation (Vcpu.continuation): it is the
    call in progress, whose work is in the rest, and replay checks it at each "resume". Not the kicks:
    they are the adapter's mailbox, which it empties (take_kicks) between calls, untraced.

    A frame's type and validated bit count only while it holds type references. Without any,
    Xen leaves them as they fell (the last reference dropped, or a failed validation:
    validate_page's type_info = 0, xen/arch/x86/mm.c): any type may be taken next, they decide
    only whether that is a type change that flushes TLBs (which the digest sees in the TLBs),
    and getpageframeinfo3 reports every such frame as NOTAB (xen/arch/x86/domctl.c). So a
    failed call that moved only them has changed nothing."""
    h = hashlib.sha256()
    frames = hv.frames
    typed = frames.type_count != 0
    kind = np.where(typed, frames.type, np.int8(0))
    flags = np.where(typed, frames.flags, frames.flags & ~np.uint8(VALIDATED))
    partial_progress = np.where(frames.flags & PARTIAL, frames.nr_validated, 0)  # meaningless elsewhere
    for array in (frames.owner, kind, frames.type_count, frames.count, flags, frames.linear, partial_progress, hv.m2p):
        h.update(array.tobytes())
    for mfn, words in hv.memory.stored():
        h.update(mfn.to_bytes(8, "little"))
        h.update(words.tobytes())
    sched = hv.sched
    for domid in sorted(hv.domains):
        domain = hv.domains[domid]
        h.update(repr((domain.info(), domain.p2m.tobytes(), sorted(domain.guest_m2p), domain.evtchn, sorted(domain.poll_mask), domain.evtchn_fifo, domain.vm_assist)).encode())
        for vcpu in domain.vcpus:
            timers = [sched.timer_expires(vcpu, kind) for kind in (SINGLESHOT_TIMER, POLL_TIMER, PERIODIC_TIMER)]
            timers += [vcpu in sched.parked.get(domid, ()), vcpu in sched.unbound]
            state = (vcpu.info(), vcpu.poll_evtchn, vcpu.virq_to_evtchn, vcpu.vgc_flags, vcpu.rip, vcpu.rsp, timers, vcpu.old_guest_tables)
            state += (vcpu.periodic_period, vcpu.periodic_last_event, vcpu.runstate, vcpu.runstate_guest, vcpu.vcpu_info_area)
            h.update(repr((state, sorted((k, repr(v)) for k, v in vcpu.tlb.entries.items()))).encode())
    h.update(repr((sched.now_ns, hv.strict_tlb)).encode())
    return h.hexdigest()


@dataclass
class ReplayReport:
    calls: int = 0
    mismatches: list[str] = field(default_factory=list)
    digest_matched: bool | None = None  # None: no end record (a prefix), final state not compared
    snapshot: bool = False  # the trace started mid-run, from a snapshot of the machine
    cut_line: int | None = None  # the last record, cut short by a writer that stopped, and skipped

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.digest_matched is not False


class Records:
    """The records of a trace read from a binary stream, header first: iterating yields
    (record number, record), numbered from 1 (the header). Any format in READABLE_FORMATS.

    A record that does not decode is a record cut short if nothing follows it (a writer that
    stopped: `cut` is its number, and it is skipped), and damage otherwise (TraceError). So
    is a compressed stream that ends early: it is read up to its last whole record."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.cut: int | None = None
        self.format: int | None = None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        try:
            yield from self._records()
        except zlib.error as e:
            raise TraceError(f"the compressed stream is damaged: {e}") from None

    def _records(self) -> Iterator[tuple[int, Any]]:
        first = self._read_line()
        if not first.strip():
            raise TraceError("empty: not a xensim trace (it has no header line)")
        header = self._header(first)
        yield 1, header
        yield from (self._lines() if self.format in (1, 2) else self._frames())

    def _read_line(self) -> bytes:
        try:
            return self.stream.readline()
        except EOFError:  # a compressed stream cut short
            return b""

    def _header(self, line: bytes) -> dict:
        try:
            header = json.loads(line.decode("ascii"))
        except UnicodeDecodeError as e:
            raise TraceError(f"not a xensim trace: byte {e.object[e.start]:#04x} is not text") from None
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict) or "xensim_trace" not in header:
            raise TraceError("line 1 is not a xensim trace header")
        if header["xensim_trace"] not in READABLE_FORMATS:
            raise TraceError(f"trace format {header['xensim_trace']}; this xensim reads formats {', '.join(map(str, READABLE_FORMATS))}")
        self.format = header["xensim_trace"]
        return header

    def _lines(self) -> Iterator[tuple[int, Any]]:
        """Formats 1 and 2: a JSON line each."""
        cut: tuple[int, Exception] | None = None
        number = 1
        while line := self._read_line():
            number += 1
            if not line.strip():
                continue
            if cut is not None:
                raise TraceError(f"line {cut[0]} is not a trace record ({cut[1]})")
            try:
                value = loads(line.decode("ascii"))
            except UnicodeDecodeError as e:
                raise TraceError(f"not a xensim trace: byte {e.object[e.start]:#04x} is not text") from None
            except (ValueError, RecursionError) as e:
                cut = number, e
                continue
            yield number, value
        self.cut = cut[0] if cut else None

    def _frames(self) -> Iterator[tuple[int, Any]]:
        """Format 3: a length and a pickle each. Only the last may be cut short."""
        number = 1
        while head := self._read(_LENGTH.size):
            number += 1
            length = _LENGTH.unpack(head)[0] if len(head) == _LENGTH.size else 0
            body = self._read(length) if length <= MAX_RECORD else b""
            if len(head) < _LENGTH.size or len(body) < length:
                if self._read(1):
                    raise TraceError(f"record {number} is damaged: its length, {length} bytes, is not what follows it")
                self.cut = number
                return
            try:
                value = _RecordUnpickler(io.BytesIO(body)).load()
            except Exception as e:  # noqa: BLE001 - whatever damaged bytes make pickle raise
                raise TraceError(f"record {number} is damaged: {e}") from None
            yield number, value

    def _read(self, size: int) -> bytes:
        """Up to `size` bytes: fewer only at the end of the stream (or of what decompresses)."""
        parts, left = [], size
        while left:
            try:
                part = self.stream.read(left)
            except EOFError:
                part = b""
            if not part:
                break
            parts.append(part)
            left -= len(part)
        return b"".join(parts)


def replay(stream: IO[bytes], calls: int | None = None, observe: Callable[[Hypervisor, dict | None], None] | None = None) -> tuple[ReplayReport, Hypervisor]:
    """Re-execute a trace, or any prefix of one (its first `calls` calls if given), and
    compare every outcome with the recorded one. Raises TraceError for input that is not a
    trace. `observe` (a reader following a frame through the run, xensim.explain) sees the
    machine it starts from (record None) and the machine after each call with that call's
    record."""
    report = ReplayReport()
    records = Records(stream)
    numbered = iter(records)
    first = next(numbered, None)
    hv = _machine(*first, report)
    if observe:
        observe(hv, None)
    for number, record in numbered:
        if report.digest_matched is not None:
            raise TraceError(f"record {number} follows the trace's end record")
        if isinstance(record, dict) and record.keys() == {"digest"}:
            report.digest_matched = record["digest"] == state_digest(hv)
            continue
        if isinstance(record, dict) and record.keys() == {"sched"}:  # a controlled run's step (docs/schedule.md section 5)
            continue
        if not _is_call(record):
            raise TraceError(f"record {number} is not a trace record")
        if calls is not None and report.calls == calls:
            break
        report.calls += 1
        expected = outcome(record)
        got = _outcome(hv, record)
        if observe:
            observe(hv, record)
        if got != expected:
            report.mismatches.append(f"record {number} ({record['op']}): recorded {expected}, replay gave {got}")
    report.cut_line = records.cut
    return report, hv


def _machine(number: int, header: dict, report: ReplayReport) -> Hypervisor:
    """The core the trace starts from: a fresh one of the header's size, or its snapshot."""
    if "snapshot" in header:
        report.snapshot = True
        try:
            return restore(header["snapshot"])
        except TraceError as e:
            raise TraceError(f"line {number}: {e}") from None
    if not isinstance(header.get("nr_frames"), int) or not isinstance(header.get("strict_tlb", False), bool):
        raise TraceError(f"line {number} is a trace header without a machine size")
    if not isinstance(header.get("preempt_work", PREEMPT_WORK), int):
        raise TraceError(f"line {number} is a trace header with a work budget that is not a number")
    return Hypervisor(nr_frames=header["nr_frames"], strict_tlb=header.get("strict_tlb", False), preempt_work=header.get("preempt_work", PREEMPT_WORK))


def _is_call(record: Any) -> bool:
    """A call record: arguments, or for a hypercall that goes on, where it goes on ("resume")."""
    if not isinstance(record, dict) or not isinstance(record.get("op"), str) or "caller" not in record:
        return False
    caller = record["caller"]
    if isinstance(record.get("resume"), dict):
        return isinstance(caller, list) and len(caller) == 2 and all(isinstance(x, int) for x in caller)
    if not isinstance(record.get("args"), dict):
        return False
    return caller is None or (isinstance(caller, list) and len(caller) == 2 and all(isinstance(x, int) for x in caller))


def _outcome(hv: Hypervisor, record: dict) -> dict:
    """What the core answers to the record's call now, as `outcome` records it: a result, a
    Xen error, or the exception of a simulator bug or of arguments the handler does not take,
    which no run records."""
    try:
        if record["caller"] is None:
            return outcome({"result": hv.toolstack(record["op"], **record["args"])})
        if "resume" in record:  # goes on from the continuation the replay itself parked
            continuation = hv.vcpu(*record["caller"]).continuation
            if continuation is None or continuation.summary() != record["resume"]:
                return {"exception": f"goes on from {record['resume']}, replay had {continuation and continuation.summary()}"}
            return outcome({"result": hv.resume(*record["caller"], continuation)})
        return outcome({"result": hv.hypercall(*record["caller"], record["op"], **record["args"])})
    except XenError as e:
        return outcome({"error": error_result(e)})
    except Exception as e:  # noqa: BLE001 - reported as the mismatch it is, with its name
        return {"exception": f"{type(e).__name__}: {e}"}
