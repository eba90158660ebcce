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
"""

import argparse
import json
from collections.abc import Iterable, Iterator

from hypervisor.core import views
from hypervisor.core.trace import replay
from hypervisor.server.tracing import open_trace, read_trace
from xensim.errors import reading
from xensim.timeline import named_mfns
from xensim.xl import frame_record, who_maps

DEFAULT_LIMIT = 5


def add_arguments(sub) -> None:
    explain = sub.add_parser("explain", help="for failed calls of a trace: the frames they name as they were then (who held them), the vCPUs involved, a focused timeline command")
    explain.add_argument("trace", help="a trace (.gz too)")
    explain.add_argument("--seq", type=int, action="append", metavar="SEQ", help="explain this failed call (repeatable; default: the first --limit failures)")
    explain.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N", help="explain at most N failures (default %(default)s)")
    explain.add_argument("--json", action="store_true", help="print one JSON document")
    explain.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    with reading(args.trace):
        explained = explain(args.trace, seqs=args.seq, limit=args.limit)
    if args.json:
        print(json.dumps([e["data"] for e in explained], indent=2))
    else:
        print("\n\n".join(e["text"] for e in explained) or "no failed calls")
    return 0


def failed_calls(records: Iterable[tuple[int, dict]]) -> Iterator[tuple[int, dict, list[str]]]:
    """(sequence number, record, errors as "op: ERRNO: message") of every call that failed or
    whose multicall entries did, in trace order; sequence numbers count calls from 1, as the
    timeline does. A call that stopped part-way is judged where it ends, a record with "resume"
    in place of "args" (docs/preemption.md), by the arguments it began with."""
    seq = 0
    stopped: dict[tuple, dict] = {}  # caller -> the arguments of its call that stopped part-way
    for _, record in records:
        if "op" not in record:
            continue
        seq += 1
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
