"""`xensim trace explain FILE`: what was holding the frames of a failed call when it failed.

A failure report names frames ("mfn 0x3dc has type L4 with 1 type references"), but by the
time anyone reads it the machine has moved on. The trace has the whole run, and the core is
deterministic, so replaying the trace up to the failed call rebuilds the machine as it was at
that moment; `views.reverse_map` then says, for every frame the error names, which entries
and base pointers held it. With that come the call's sequence number, the vCPUs involved (the
caller, and every vCPU whose base pointer was on one of the frames) and the command that
opens the timeline focused on it.

`explain` finds the failed calls (every call, or multicall entry, that ended with an errno)
in one pass, and replays once per failure it explains, so it is meant for a few failures
(`--limit`), picked by sequence number or by the text of a report (a kernel BUG quotes Xen's
message).

An audit finding or a page that read back wrong is no failed call: nothing failed, something
earlier went wrong. For those the replay follows the frames the report names through the run
and notes the last call that changed each one (its frame-table entry or its contents), which
is where to look; the report then shows them as they were when the finding was made (the
audit: before the domains were destroyed; the read: just before it), with who mapped them,
which vCPUs' TLBs still translated to them, and the timeline focused on that last change.
"""

import argparse
import json
import re
import struct
from collections.abc import Iterable, Iterator

from hypervisor.core import Hypervisor, views
from hypervisor.core.abi import PAGE_SHIFT
from hypervisor.core.trace import dumps, replay
from hypervisor.core.walk import translate
from hypervisor.server.tracing import open_trace, read_trace
from xensim.errors import UsageError, reading
from xensim.timeline import named_mfns
from xensim.xl import frame_record, who_maps

DEFAULT_LIMIT = 5


def add_arguments(sub) -> None:
    explain = sub.add_parser("explain", help="for failed calls of a trace: the frames they name as they were then (who held them), the vCPUs involved, a focused timeline command")
    explain.add_argument("trace", help="a trace (.gz too)")
    explain.add_argument("--seq", type=int, action="append", metavar="SEQ", help="explain this failed call (repeatable; default: the first --limit failures)")
    explain.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N", help="explain at most N failures (default %(default)s)")
    explain.add_argument("--finding", action="append", metavar="TEXT", help="instead: an audit finding (as stress and demo print it): its frames as they were, the calls that last changed them")
    explain.add_argument("--after", type=int, metavar="SEQ", help="with --finding: the audit ran after call SEQ (default: the end; stress and demo audit each domain before the first destroy_domain)")
    explain.add_argument("--corruption", action="append", metavar="TEXT", help="instead: a data corruption (as stress and demo print it): the read, its frames, the calls that last changed them")
    explain.add_argument("--json", action="store_true", help="print one JSON document")
    explain.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    with reading(args.trace):
        if args.finding or args.corruption:
            explained = explain_findings(args.trace, args.finding, args.after) if args.finding else []
            for report in args.corruption or []:
                found = explain_corruption(args.trace, report)
                if found is None:
                    raise UsageError(f"no read in {args.trace} matches {report[:80]!r}: give a data-corruption line as stress or demo print it, with its domN prefix")
                explained.append(found)
        else:
            explained = explain(args.trace, seqs=args.seq, limit=args.limit)
    if args.json:
        print(json.dumps([e["data"] for e in explained], indent=2))
    else:
        print("\n\n".join(e["text"] for e in explained) or "no failed calls")
    return 0


def calls(records: Iterable[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    """(sequence number, record) of every call among a trace's records (read_trace), numbered
    from 1 as the timeline and replay count them."""
    seq = 0
    for _, record in records:
        if isinstance(record, dict) and "op" in record:
            seq += 1
            yield seq, record


def failed_calls(records: Iterable[tuple[int, dict]]) -> Iterator[tuple[int, dict, list[str]]]:
    """(sequence number, record, errors as "op: ERRNO: message") of every call that failed or
    whose multicall entries did, in trace order; sequence numbers count calls from 1, as the
    timeline does. A call that stopped part-way is judged where it ends, a record with "resume"
    in place of "args" (docs/preemption.md), by the arguments it began with."""
    stopped: dict[tuple, dict] = {}  # caller -> the arguments of its call that stopped part-way
    for seq, record in calls(records):
        caller = tuple(record["caller"] or ())
        args = stopped.pop(caller, {}) if "resume" in record else record.get("args", {})
        result = record.get("result")
        if isinstance(result, dict) and "continuation" in result:
            stopped[caller] = args
            continue
        errors = [f"{record['op']}: {record['error']['errno']}: {record['error']['message']}"] if "error" in record else []
        if record["op"] == "multicall":
            for entry, outcome in zip(args.get("calls", []), result or []):
                if "errno" in outcome:
                    errors.append(f"{entry['op']}: {outcome['errno']}: {outcome['message']}")
        if errors:
            yield seq, record, errors


def explain(path: str, seqs: list[int] | None = None, matching: list[str] | None = None, limit: int = DEFAULT_LIMIT) -> list[dict]:
    """Explain the failed calls numbered `seqs`, or those whose error message occurs in one of
    the `matching` reports (a kernel BUG quotes it), or else the first ones; at most `limit`.
    Each is {"data": JSON-able, "text": for people}."""
    chosen = []
    for seq, record, errors in failed_calls(read_trace(path)):
        messages = [e.split(": ", 2)[2] for e in errors]
        if seqs is not None and seq not in seqs:
            continue
        if matching is not None and not any(m in report for m in messages for report in matching):
            continue
        chosen.append((seq, record, errors))
        if len(chosen) >= limit:
            break
    return [_explain_one(path, seq, record, errors) for seq, record, errors in chosen]


def _explain_one(path: str, seq: int, record: dict, errors: list[str]) -> dict:
    with open_trace(path) as stream:
        _, hv = replay(stream, calls=seq)  # calls 1..seq: the failed call changed nothing
    caller = f"dom{record['caller'][0]} vCPU{record['caller'][1]}" if record["caller"] else "the toolstack"
    frames, texts, vcpus = [], [], [caller]
    for mfn in sorted(set().union(*(named_mfns(e) for e in errors))):
        if not 0 <= mfn < hv.nr_frames:
            continue
        found = views.reverse_map(hv, mfn)
        data, text = who_maps(frame_record(found["frame"]), found["entries"], found["bases"])
        frames.append(data)
        texts.append(text)
        vcpus += [f"dom{b['domid']} vCPU{b['vcpu']}" for b in found["bases"] if f"dom{b['domid']} vCPU{b['vcpu']}" not in vcpus]
    command = f"xensim timeline {path} --html focus-{seq}.html --focus {seq}"
    data = {"seq": seq, "caller": caller, "errors": errors, "vcpus": vcpus, "frames": frames, "timeline": command}
    text = "\n".join(
        [f"#{seq} {caller}: " + "\n    ".join(errors), f"  vCPUs involved: {', '.join(vcpus)}", "  the frames it names, as they were then:"]
        + ["    " + t.replace("\n", "\n    ") for t in texts]
        + [f"  see it: {command}"]
    )
    return {"data": data, "text": text}


# -- audit findings and corrupted data: the frames, and the calls that last changed them ------

# What the data-integrity oracle reports (guestlib/kernel/mm.py, describe_corruption), with
# the domain stress puts in front.
CORRUPTION = re.compile(
    r"dom(?P<domid>\d+) task \d+ generation 0x[0-9a-f]+ page \d+ \(va (?P<va>0x[0-9a-f]+), mfn (?P<mfn>0x[0-9a-f]+)\) on vCPU (?P<vcpu>\d+): "
    r".*\(it read task (?P<task>\d+) page (?P<page>\d+) generation (?P<generation>0x[0-9a-f]+)\)"
)


def _fingerprint(hv: Hypervisor, mfn: int) -> tuple:
    """A frame as a call can change it: its frame-table entry, its M2P entry, its contents."""
    f = hv.frames
    return (f.owner.item(mfn), f.type.item(mfn), f.type_count.item(mfn), f.count.item(mfn), f.flags.item(mfn), f.linear.item(mfn), hv.m2p.item(mfn), hv.memory.entries(mfn).tobytes())


def _follow(path: str, mfns: set[int], until: int | None = None) -> tuple[Hypervisor, dict[int, tuple[int, dict]]]:
    """Replay calls 1..`until` (all of them by default) and note, for each frame of `mfns`,
    the last call that changed it: the machine as it is then, and {mfn: (seq, record)}."""
    last: dict[int, tuple[int, dict]] = {}
    state: dict[int, tuple] = {}
    seq = 0

    def observe(hv: Hypervisor, record: dict | None) -> None:
        nonlocal seq
        seq += record is not None
        for mfn in mfns:
            if 0 <= mfn < hv.nr_frames:
                now = _fingerprint(hv, mfn)
                if record is not None and state[mfn] != now:
                    last[mfn] = (seq, record)
                state[mfn] = now

    with open_trace(path) as stream:
        _, hv = replay(stream, calls=until, observe=observe)
    return hv, last


def _brief(seq: int, record: dict) -> str:
    """A call on one line: its number, caller, op and the start of its arguments."""
    caller = f"dom{record['caller'][0]} vCPU{record['caller'][1]}" if record["caller"] else "the toolstack"
    args = dumps(record.get("args", record.get("resume")))  # bytes as {"hex": ...}
    return f"#{seq} {caller} {record['op']} {args[:160]}{'...' if len(args) > 160 else ''}"


def _tlb_holders(hv: Hypervisor, mfn: int) -> list[dict]:
    """Every vCPU whose TLB still translates some address to `mfn`, and the addresses."""
    return [
        {"domid": d.domid, "vcpu": v.vcpu_id, "vas": [hex(vpn << PAGE_SHIFT) for vpn, e in v.tlb.entries.items() if e.mfn == mfn]}
        for d in hv.domains.values()
        for v in d.vcpus
        if v.tlb.maps(mfn)
    ]


def _frames_then(hv: Hypervisor, mfns: list[int], last: dict[int, tuple[int, dict]]) -> tuple[list[dict], list[str], list[str]]:
    """Each frame as it is in `hv` (who maps it, whose TLB has it) with the last call that
    changed it: JSON-able records, their text, and the vCPUs they involve."""
    frames, texts, vcpus = [], [], []
    for mfn in mfns:
        if not 0 <= mfn < hv.nr_frames:
            continue
        found = views.reverse_map(hv, mfn)
        data, text = who_maps(frame_record(found["frame"]), found["entries"], found["bases"])
        data["tlbs"] = _tlb_holders(hv, mfn)
        text += "".join(f"\n  in the TLB of dom{t['domid']} vCPU {t['vcpu']} (va {', '.join(t['vas'])})" for t in data["tlbs"])
        changed = last.get(mfn)
        data["last_changed"] = None if changed is None else {"seq": changed[0], "call": _brief(*changed)}
        text += f"\n  last changed by {_brief(*changed)}" if changed else "\n  not changed by any call of the trace"
        frames.append(data)
        texts.append(text)
        who = [f"dom{b['domid']} vCPU{b['vcpu']}" for b in found["bases"] + data["tlbs"]]
        if changed and changed[1]["caller"]:
            who.insert(0, f"dom{changed[1]['caller'][0]} vCPU{changed[1]['caller'][1]}")
        vcpus += [w for w in dict.fromkeys(who) if w not in vcpus]
    return frames, texts, vcpus


def _report(path: str, what: str, when: str, frames: list[dict], texts: list[str], vcpus: list[str], extra: dict) -> dict:
    """The explanation of a finding: its frames as they were `when`, the vCPUs involved and
    the timeline focused on the latest call that changed one of its frames."""
    changes = [f["last_changed"]["seq"] for f in frames if f["last_changed"]]
    seq = max(changes, default=None)
    command = None
    if seq is not None:
        command = f"xensim timeline {path} --html focus-{seq}.html --focus {seq}" + "".join(f" --mfn {f['frame']['mfn']}" for f in frames)
    data = {"report": what, "seq": seq, "vcpus": vcpus, "frames": frames, "timeline": command, **extra}
    lines = [what, f"  vCPUs involved: {', '.join(vcpus) or 'none'}", f"  the frames it names, {when}:" if frames else "  it names no frame"]
    lines += ["    " + t.replace("\n", "\n    ") for t in texts]
    lines += [f"  see it: {command}"] if command else []
    return {"data": data, "text": "\n".join(lines)}


def explain_findings(path: str, findings: list[str], until: int | None = None) -> list[dict]:
    """Explain audit findings made after call `until` (default: at the end of the trace): for
    each frame a finding names, who held it then and the last call that changed it. One
    replay for them all."""
    named = [sorted(named_mfns(f)) for f in findings]
    hv, last = _follow(path, set().union(*named), until)
    when = "when the audit found it" + (f" (after call #{until})" if until is not None else " (the end of the trace)")
    return [_report(path, f"audit finding: {finding}", when, *_frames_then(hv, mfns, last), {"after": until}) for finding, mfns in zip(findings, named)]


def explain_corruption(path: str, report: str) -> dict | None:
    """Explain a page that read back wrong (`CORRUPTION`): find the read in the trace (a read
    of that address by that vCPU whose data starts as the report says it read, see
    `_the_tasks_read`),
    replay up to it, and report the frame the task's L1 entry maps and the frame the read
    used (they differ when a stale TLB entry served it), each with who held it and the last
    call that changed it. None if the report is not the oracle's or its read is not traced."""
    match = CORRUPTION.search(report)
    if match is None:
        return None
    domid, vcpu, va = int(match["domid"]), int(match["vcpu"]), int(match["va"], 16)
    found = struct.pack("<QQQ", int(match["task"]), int(match["page"]), int(match["generation"], 16))
    reads = [(seq, bool(r["args"].get("user"))) for seq, r in calls(read_trace(path)) if r["op"] == "read" and r["caller"] == [domid, vcpu] and r["args"].get("va") == va]
    mapped = int(match["mfn"], 16)
    chosen = _the_tasks_read(path, reads, domid, vcpu, va, mapped, found)
    if chosen is None:
        return None
    seq, user = chosen
    hv, last = _follow(path, {mapped}, seq - 1)
    used = _read_frame(hv, domid, vcpu, va, user)
    mfns = [mapped] + ([used] if used not in (None, mapped) else [])
    if len(mfns) > 1:  # a stale translation: follow the frame it reached as well
        hv, last = _follow(path, set(mfns), seq - 1)
    frames, texts, vcpus = _frames_then(hv, mfns, last)
    reader = f"dom{domid} vCPU{vcpu}"
    stale = f"; the read used mfn {used:#x}, which its TLB still held (stale)" if used not in (None, mapped) else ""
    what = f"data corruption: {report}\n  read back by call #{seq} ({reader}, va {va:#x}); the task's L1 entry maps mfn {mapped:#x}{stale}"
    return _report(path, what, f"just before call #{seq}", frames, texts, [reader] + [v for v in vcpus if v != reader], {"read": seq, "read_from": None if used is None else hex(used)})


def _the_tasks_read(path: str, reads: list[tuple[int, bool]], domid: int, vcpu_id: int, va: int, mapped: int, found: bytes) -> tuple[int, bool] | None:
    """Of the vCPU's reads of `va`, those that returned `found` (the trace keeps a read's
    data as a checksum only, so each is recomputed by replay just before the read: the bytes
    at `va` in the frame the read would use); of several (a task's own, and another task's
    that read it through a stale translation) the last made while the vCPU's tables mapped
    the address to the reported frame, or else the last. None if no read returned `found`."""
    before = {seq - 1: (seq, user) for seq, user in reads}
    returned, mapped_then = [], []
    n = 0

    def observe(hv: Hypervisor, record: dict | None) -> None:
        nonlocal n
        n += record is not None
        if n in before:
            seq, user = before[n]
            used = _read_frame(hv, domid, vcpu_id, va, user)
            offset = va & ((1 << PAGE_SHIFT) - 1)
            if used is None or hv.memory.read(used, offset, len(found)) != found:
                return
            returned.append((seq, user))
            vcpu = hv.vcpu(domid, vcpu_id)
            if translate(hv.memory, vcpu.base(user), va, mode=vcpu.mode) == mapped:
                mapped_then.append((seq, user))

    if reads:
        with open_trace(path) as stream:
            replay(stream, calls=reads[-1][0] - 1, observe=observe)  # the calls before the last read
    return (mapped_then or returned or [None])[-1]


def _read_frame(hv: Hypervisor, domid: int, vcpu_id: int, va: int, user: bool) -> int | None:
    """The frame an access of `va` by the vCPU in that mode would use now: its TLB entry, if
    one serves the mode (cpu.py), else the walk of the mode's base."""
    vcpu = hv.vcpu(domid, vcpu_id)
    cached = vcpu.tlb.lookup(va >> PAGE_SHIFT)
    if cached is not None and (cached.user == user or cached.is_global):
        return cached.mfn
    return translate(hv.memory, vcpu.base(user), va, mode=vcpu.mode)


def explain_run(path: str, report: dict, limit: int = DEFAULT_LIMIT) -> list[dict]:
    """What demo and stress print after a run that went wrong, from its trace and `report`
    (stress's): its kernel BUGs (or else its first unexpected failed calls), audit findings
    and corrupted pages, at most `limit` of each."""
    explained = []
    if report["kernel_bugs"] or report["unexpected_errors"]:
        explained += explain(path, matching=report["kernel_bugs"] or None, limit=limit)
    findings = report.get("findings", {})
    by_domain = [f for key, found in findings.items() if key != "machine" for f in found][:limit]
    if by_domain:  # the audit of each domain ran before the first destroy
        destroy = next((seq for seq, r in calls(read_trace(path)) if r["op"] == "destroy_domain"), None)
        explained += explain_findings(path, by_domain, None if destroy is None else destroy - 1)
    if findings.get("machine"):
        explained += explain_findings(path, findings["machine"][:limit])
    for corruption in report.get("corruptions", [])[:limit]:
        found = explain_corruption(path, corruption)
        explained += [found] if found else []
    return explained
