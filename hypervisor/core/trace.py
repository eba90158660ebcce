"""Trace and replay: every call as one JSON line; replaying into a fresh core reproduces it.

The core is deterministic, so a trace (a header naming the machine size, then one line per
hypercall or toolstack op with its caller, arguments and result or error) is a complete
recording of a run: `replay` re-executes it and reports every result that differs, and the
state digest written at the end lets it check that the final state is the same too.
Bytes (memory contents) are written as {"hex": "..."}.
"""

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from .errors import XenError
from .frames import VALIDATED
from .hypervisor import Hypervisor, error_result
from .schedop import POLL_TIMER, SINGLESHOT_TIMER

FORMAT = 1


def _encode(value):
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
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
        out.write(dumps({"xensim_trace": FORMAT, "nr_frames": hv.nr_frames, "strict_tlb": hv.strict_tlb}) + "\n")

    def __call__(self, record: dict) -> None:
        self.calls += 1
        self.out.write(dumps(record) + "\n")

    def close(self) -> None:
        """Write the final state digest, so a replay can check the state it ends in."""
        self.out.write(dumps({"digest": state_digest(self.hv)}) + "\n")
        self.out.flush()


def state_digest(hv: Hypervisor) -> str:
    """A hash of everything the model holds: frame table, M2P, memory, domains and their
    port tables, vCPUs with their TLBs, timers and scheduler state, pending kicks, the clock.

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
    for array in (frames.owner, kind, frames.type_count, frames.count, flags, frames.linear, hv.m2p):
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
            state = (vcpu.info(), vcpu.poll_evtchn, vcpu.virq_to_evtchn, vcpu.vgc_flags, vcpu.rip, vcpu.rsp, timers)
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
    """Re-execute a trace into a fresh core and compare every outcome with the recorded one."""
    report = ReplayReport()
    hv: Hypervisor | None = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = loads(line)
        if "xensim_trace" in record:
            hv = Hypervisor(nr_frames=record["nr_frames"], strict_tlb=record.get("strict_tlb", False))
            continue
        if hv is None:
            raise ValueError("a trace starts with its header line")
        if "digest" in record:
            report.digest_matched = record["digest"] == state_digest(hv)
            continue
        report.calls += 1
        expected = {"error": record["error"]} if "error" in record else {"result": record.get("result")}
        try:
            if record["caller"] is None:
                got = {"result": hv.toolstack(record["op"], **record["args"])}
            else:
                got = {"result": hv.hypercall(*record["caller"], record["op"], **record["args"])}
        except XenError as e:
            got = {"error": error_result(e)}
        if loads(dumps(got)) != expected:
            report.mismatches.append(f"line {number} ({record['op']}): recorded {expected}, replay gave {got}")
    if hv is None:
        raise ValueError("empty trace")
    return report, hv
