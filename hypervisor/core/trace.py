"""Trace and replay: every call as one JSON line; replaying into a fresh core reproduces it.

The core is deterministic, so a trace (a header naming the machine size, then one line per
hypercall or toolstack op with its caller, arguments and result or error) is a complete
recording of a run: `replay` re-executes it and reports every result that differs, and the
state digest written at the end lets it check that the final state is the same too.
Bytes (memory contents) are written as {"hex": "..."}. A hypercall that stopped at a
preemption point has the result {"continuation": {where it stopped}}; each time it goes on is
a line of its own with "resume" (where it went on) in place of "args", as Xen's re-issued
hypercall is a call of its own. The header names the work budget, so that a replay stops at
the same points.
"""

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from .abi import PREEMPT_WORK
from .errors import XenError
from .frames import PARTIAL
from .hypervisor import Hypervisor, error_result
from .preempt import Continuation
from .schedop import POLL_TIMER, SINGLESHOT_TIMER

FORMAT = 1


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
        out.write(dumps(header) + "\n")

    def __call__(self, record: dict) -> None:
        self.calls += 1
        self.out.write(dumps(record) + "\n")

    def close(self) -> None:
        """Write the final state digest, so a replay can check the state it ends in."""
        self.out.write(dumps({"digest": state_digest(self.hv)}) + "\n")
        self.out.flush()


def state_digest(hv: Hypervisor) -> str:
    """A hash of everything the model holds: frame table, M2P, memory, domains and their
    port tables, vCPUs with their TLBs, timers and scheduler state, pending kicks, the clock."""
    h = hashlib.sha256()
    frames = hv.frames
    partial_progress = np.where(frames.flags & PARTIAL, frames.nr_validated, 0)  # meaningless elsewhere
    for array in (frames.owner, frames.type, frames.type_count, frames.count, frames.flags, frames.linear, partial_progress, hv.m2p):
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
    h.update(repr((list(sched.kicks), sched.now_ns, hv.strict_tlb)).encode())
    return h.hexdigest()


@dataclass
class ReplayReport:
    calls: int = 0
    mismatches: list[str] = field(default_factory=list)
    digest_matched: bool | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.digest_matched is not False


def replay(lines: Iterable[str]) -> tuple[ReplayReport, Hypervisor]:
    """Re-execute a trace into a fresh core and compare every outcome with the recorded one.
    A call that goes on ("resume") goes on from the continuation the replay itself got."""
    report = ReplayReport()
    hv: Hypervisor | None = None
    pending: dict[tuple[int, int], Continuation] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = loads(line)
        if "xensim_trace" in record:
            hv = Hypervisor(nr_frames=record["nr_frames"], strict_tlb=record.get("strict_tlb", False), preempt_work=record.get("preempt_work", PREEMPT_WORK))
            continue
        if hv is None:
            raise ValueError("a trace starts with its header line")
        if "digest" in record:
            report.digest_matched = record["digest"] == state_digest(hv)
            continue
        report.calls += 1
        expected = {"error": record["error"]} if "error" in record else {"result": record.get("result")}
        caller = record["caller"]
        try:
            if caller is None:
                got = {"result": hv.toolstack(record["op"], **record["args"])}
            elif "resume" in record:
                continuation = pending.pop(tuple(caller), None)
                if continuation is None or continuation.summary() != record["resume"]:
                    report.mismatches.append(f"line {number} ({record['op']}): goes on from {record['resume']}, replay had {continuation and continuation.summary()}")
                    continue
                got = {"result": hv.resume(*caller, continuation)}
            else:
                got = {"result": hv.hypercall(*caller, record["op"], **record["args"])}
        except XenError as e:
            got = {"error": error_result(e)}
        if isinstance(got.get("result"), Continuation):
            pending[tuple(caller)] = got["result"]
        if loads(dumps(got)) != expected:
            report.mismatches.append(f"line {number} ({record['op']}): recorded {expected}, replay gave {got}")
    if hv is None:
        raise ValueError("empty trace")
    return report, hv
