"""Trace and replay: every call as one JSON line; replaying it into a core reproduces the run.

The core is deterministic, so a trace is a complete recording of a run: a header naming the
machine the run starts from, one line per hypercall or toolstack op with its caller, arguments
and result or error, and an end record with the final state digest. `replay` re-executes it,
reports every result that differs, and with the end record checks the final state too. Bytes
(memory contents) are written as {"hex": "..."}.

A hypercall that stopped at a preemption point has the result {"continuation": {where it
stopped}}; each time it goes on is a line of its own with "resume" (where it went on) in place
of "args", as Xen's re-issued hypercall is a call of its own. The core parks the continuation
on its vCPU (Vcpu.continuation) until it goes on, so a snapshot holds the calls in progress
too. The header names the work budget, so that a replay stops at the same points.

The header gives the starting machine by its size when the trace starts before any call (a
fresh core), and otherwise carries a snapshot of the whole core (`snapshot`), so a trace started
mid-run replays as well. Any prefix of a trace replays as the run so far: a writer that stopped
(a killed server, a full disk) leaves whole records and at most one last line cut short, which
replay skips; without the end record the final state is not compared.
"""

import base64
import hashlib
import inspect
import io
import json
import pickle
import types
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from .abi import PREEMPT_WORK
from .errors import XenError
from .frames import PARTIAL, VALIDATED
from .hypervisor import Hypervisor, error_result
from .preempt import Continuation
from .schedop import POLL_TIMER, SINGLESHOT_TIMER

FORMAT = 2  # 2: the header may carry a snapshot; format 1 never does and replays the same way
READABLE_FORMATS = (1, FORMAT)


class TraceError(ValueError):
    """Input that replay cannot use as a trace; the message names the line and says why."""


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


class TraceWriter:
    """Attach to `hv.tracer`; writes the header at once and each call as it completes."""

    def __init__(self, hv: Hypervisor, out: IO[str]):
        self.hv = hv
        self.out = out
        self.calls = 0
        header = {"xensim_trace": FORMAT, "nr_frames": hv.nr_frames, "strict_tlb": hv.strict_tlb, "preempt_work": hv.budget.per_call}
        if hv.stats:  # every call is counted there: this machine is no longer a fresh one
            header["snapshot"] = snapshot(hv)
        out.write(dumps(header) + "\n")

    def __call__(self, record: dict) -> None:
        self.calls += 1
        self.out.write(dumps(record) + "\n")

    def close(self) -> None:
        """Write the end record, the final state digest, so a replay can check the state it ends in."""
        self.out.write(dumps({"digest": state_digest(self.hv)}) + "\n")
        self.out.flush()


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
        h.update(repr((domain.info(), domain.p2m.tobytes(), sorted(domain.guest_m2p), domain.evtchn, sorted(domain.poll_mask))).encode())
        for vcpu in domain.vcpus:
            timers = [sched.timer_expires(vcpu, kind) for kind in (SINGLESHOT_TIMER, POLL_TIMER)]
            state = (vcpu.info(), vcpu.poll_evtchn, vcpu.virq_to_evtchn, vcpu.vgc_flags, vcpu.rip, vcpu.rsp, timers, vcpu.old_guest_tables)
            h.update(repr((state, sorted((k, repr(v)) for k, v in vcpu.tlb.entries.items()))).encode())
    h.update(repr((sched.now_ns, hv.strict_tlb)).encode())
    return h.hexdigest()


@dataclass
class ReplayReport:
    calls: int = 0
    mismatches: list[str] = field(default_factory=list)
    digest_matched: bool | None = None  # None: no end record (a prefix), final state not compared
    snapshot: bool = False  # the trace started mid-run, from a snapshot of the machine
    cut_line: int | None = None  # the last line, cut short by a writer that stopped, and skipped

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.digest_matched is not False


def replay(lines: Iterable[str], observe: Callable[[Hypervisor, dict | None], None] | None = None) -> tuple[ReplayReport, Hypervisor]:
    """Re-execute a trace, or any prefix of one, and compare every outcome with the recorded
    one. Raises TraceError for input that is not a trace. `observe` (a reader following a
    frame through the run, xensim.explain) sees the machine it starts from (record None) and
    the machine after each call with that call's record."""
    report = ReplayReport()
    records = _decoded(lines, report)
    first = next(records, None)
    if first is None:
        if report.cut_line is not None:
            raise TraceError(f"line {report.cut_line} is not a xensim trace header")
        raise TraceError("empty: not a xensim trace (it has no header line)")
    hv = _machine(*first, report)
    if observe:
        observe(hv, None)
    for number, record in records:
        if report.digest_matched is not None:
            raise TraceError(f"line {number} follows the trace's end record")
        if isinstance(record, dict) and record.keys() == {"digest"}:
            report.digest_matched = record["digest"] == state_digest(hv)
            continue
        if isinstance(record, dict) and record.keys() == {"sched"}:  # a controlled run's step (docs/schedule.md section 5)
            continue
        if not _is_call(record):
            raise TraceError(f"line {number} is not a trace record")
        report.calls += 1
        expected = {"error": record["error"]} if "error" in record else {"result": record.get("result")}
        got = _outcome(hv, record)
        if observe:
            observe(hv, record)
        if loads(dumps(got)) != expected:
            report.mismatches.append(f"line {number} ({record['op']}): recorded {expected}, replay gave {got}")
    return report, hv


def _decoded(lines: Iterable[str], report: ReplayReport) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each line. A line that does not decode is a record cut
    short if nothing follows it (`report.cut_line`), and damage otherwise."""
    cut: tuple[int, Exception] | None = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if cut is not None:
            raise TraceError(f"line {cut[0]} is not a trace record ({cut[1]})")
        try:
            value = loads(line)
        except (ValueError, RecursionError) as e:
            cut = number, e
            continue
        yield number, value
    report.cut_line = cut[0] if cut else None


def _machine(number: int, header: Any, report: ReplayReport) -> Hypervisor:
    """The core the trace starts from: a fresh one of the header's size, or its snapshot."""
    if not isinstance(header, dict) or "xensim_trace" not in header:
        raise TraceError(f"line {number} is not a xensim trace header")
    if header["xensim_trace"] not in READABLE_FORMATS:
        raise TraceError(f"trace format {header['xensim_trace']}; this xensim reads formats {' and '.join(map(str, READABLE_FORMATS))}")
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
    """What the core answers to the record's call now: a result, a Xen error, or the exception
    of a simulator bug or of arguments the handler does not take, which no run records."""
    try:
        if record["caller"] is None:
            return {"result": hv.toolstack(record["op"], **record["args"])}
        if "resume" in record:  # goes on from the continuation the replay itself parked
            continuation = hv.vcpu(*record["caller"]).continuation
            if continuation is None or continuation.summary() != record["resume"]:
                return {"exception": f"goes on from {record['resume']}, replay had {continuation and continuation.summary()}"}
            return {"result": hv.resume(*record["caller"], continuation)}
        return {"result": hv.hypercall(*record["caller"], record["op"], **record["args"])}
    except XenError as e:
        return {"error": error_result(e)}
    except Exception as e:  # noqa: BLE001 - reported as the mismatch it is, with its name
        return {"exception": f"{type(e).__name__}: {e}"}
