"""`xensim trace export FILE --format chrome --out OUT`: a trace for Perfetto and chrome://tracing.

The output is the Trace Event format (the JSON object form: {"traceEvents": [...]}): a
process per domain and a thread per vCPU, named with metadata events; each call a complete
event ("X") on its vCPU's thread, with its lines (a multicall's entries one each) and errors
as arguments; each failure also an instant event ("i", thread scope) named by its errno;
each IPI a flow ("s" on the sender's call, "f" on the next call of the vCPU it notifies,
which is where the upcall arrives); and which table each vCPU runs on as slices of a second
thread per vCPU ("vCPUn cr3"). The toolstack's calls are process 0.

A trace has no clock (the core is deterministic), so time is the call's sequence number: one
call per microsecond. Order is what a race is about; durations mean nothing.
"""

import argparse
import json
from pathlib import Path

from hypervisor.server.tracing import read_trace
from xensim.errors import reading
from xensim.explain import add_arguments as add_explain_arguments
from xensim.timeline import XEN_LANE, Call, scan

CR3_TID = 1000  # the cr3 thread of vCPU n is CR3_TID + n
CALL_US = 0.8  # a call's slice, shorter than the 1 µs step so neighbours do not touch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="trace_command", required=True, metavar="COMMAND")
    export = sub.add_parser("export", help="write a trace in another tool's format (chrome: Trace Event JSON for Perfetto and chrome://tracing)")
    export.add_argument("trace", help="a trace (.gz too): `xensim serve --trace FILE` or Toolstack StartTrace")
    export.add_argument("--format", choices=("chrome",), default="chrome", help="the output format (default %(default)s)")
    export.add_argument("--out", "-o", required=True, metavar="OUT", help="the file to write")
    export.set_defaults(run=main)
    add_explain_arguments(sub)


def main(args: argparse.Namespace) -> int:
    with reading(args.trace):
        events = chrome_events(scan(read_trace(args.trace)))
    Path(args.out).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"source": Path(args.trace).name, "time": "call sequence number, 1 µs per call"}}))
    print(f"{args.out}: {sum(e['ph'] == 'X' and e['cat'] != 'cr3' for e in events)} calls, {sum(e['ph'] == 'i' for e in events)} failures, {sum(e['ph'] == 's' for e in events)} IPIs")
    return 0


def _where(lane: tuple | None) -> tuple[int, int]:
    return (0, 0) if lane is None else lane


def chrome_events(timeline) -> list[dict]:
    events = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "ts": 0, "args": {"name": XEN_LANE}}]
    for domid in sorted({d for d, _ in timeline.lanes}):
        events.append({"name": "process_name", "ph": "M", "pid": domid, "tid": 0, "ts": 0, "args": {"name": f"dom{domid}"}})
    for domid, vcpu in sorted(timeline.lanes):
        events.append({"name": "thread_name", "ph": "M", "pid": domid, "tid": vcpu, "ts": 0, "args": {"name": f"vCPU{vcpu}"}})
        events.append({"name": "thread_name", "ph": "M", "pid": domid, "tid": CR3_TID + vcpu, "ts": 0, "args": {"name": f"vCPU{vcpu} cr3"}})
    for (domid, vcpu), start, end, mfn in timeline.bands:
        events.append({"name": f"cr3 0x{mfn:x}", "cat": "cr3", "ph": "X", "pid": domid, "tid": CR3_TID + vcpu, "ts": start, "dur": end - start, "args": {"mfn": f"0x{mfn:x}"}})
    for call in timeline.calls:
        events += _call_events(call)
    return events


def _call_events(call: Call) -> list[dict]:
    pid, tid = _where(call.lane)
    name = call.lines[0].strip() if call.lines else call.kind
    out = [{"name": name, "cat": call.kind, "ph": "X", "pid": pid, "tid": tid, "ts": call.seq, "dur": CALL_US, "args": {"seq": call.seq, "lines": call.lines, "errors": call.errors}}]
    for error in call.errors:
        op, errno, message = (error.split(": ", 2) + ["", ""])[:3]
        out.append({"name": f"{op} -{errno}", "cat": "error", "ph": "i", "s": "t", "pid": pid, "tid": tid, "ts": call.seq, "args": {"message": message, "seq": call.seq}})
    if call.target is not None:
        flow = {"name": "IPI", "cat": "ipi", "id": call.seq, "ts": call.seq}
        out.append({**flow, "ph": "s", "pid": pid, "tid": tid})
        out.append({**flow, "ph": "f", "pid": call.target[0], "tid": call.target[1], "ts": call.seq + 0.5})  # binds to the target's next call
    return out
