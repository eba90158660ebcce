"""`xensim timeline TRACE --html OUT`: a hypercall trace as one lane per vCPU, for a browser.

The x axis is the call's sequence number in the trace: the core has no clock (it must stay
deterministic to replay), so the picture shows order, which is what a race is about. Behind
each lane, a band coloured by mfn shows which page table the vCPU runs on (its kernel cr3),
so an unpin of a table that another lane still sits on stands out. The page is one
self-contained file: the trace's events as JSON, drawn into SVG by a little inline script.
"""

import argparse
import html
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.core.abi import PAGE_SHIFT, PTE_MFN_MASK, VMASST_TYPE_NAMES, MmuextCmd, VMASST_CMD_disable, VMASST_CMD_enable
from hypervisor.core.paging import MODES
from hypervisor.core.trace import TraceError
from hypervisor.server.tracing import read_trace
from xensim.errors import at_least, reading, writable_file
from xensim.xl import level_name, mfn_arg

DEFAULT_COUNT = 50_000  # more than this makes a page browsers draw slowly
FOCUS_BEFORE, FOCUS_COUNT = 200, 400  # the window --focus draws around its call, unless --first/--count say
MFN_ARG_CMDS = {MmuextCmd.UNPIN_TABLE, MmuextCmd.NEW_BASEPTR, MmuextCmd.NEW_USER_BASEPTR, MmuextCmd.CLEAR_PAGE, MmuextCmd.COPY_PAGE}
MMUEXT_NAMES = {cmd.value: cmd.name for cmd in MmuextCmd}
MEMORY_OPS = {"load", "store", "atomic", "read", "write"}
_VMASST_CMDS = {VMASST_CMD_enable: "enable", VMASST_CMD_disable: "disable"}
PIN_CMDS = {MmuextCmd.PIN_L1_TABLE, MmuextCmd.PIN_L2_TABLE, MmuextCmd.PIN_L3_TABLE, MmuextCmd.PIN_L4_TABLE}
FLUSH_CMDS = {MmuextCmd.TLB_FLUSH_LOCAL, MmuextCmd.INVLPG_LOCAL, MmuextCmd.TLB_FLUSH_MULTI, MmuextCmd.INVLPG_MULTI, MmuextCmd.TLB_FLUSH_ALL, MmuextCmd.INVLPG_ALL}
# What a call's marker shows when it did several things, most telling first.
KINDS = ["error", "cr3", "unpin", "pin", "ipi", "upcall", "flush", "pte", "fault", "sched", "evtchn", "toolstack", "mem", "other"]
XEN_LANE = "Xen (toolstack)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="a trace (.gz too): `xensim serve --trace FILE` or Toolstack StartTrace")
    parser.add_argument("--html", required=True, metavar="OUT", type=writable_file, help="the page to write")
    parser.add_argument("--first", type=at_least(1), metavar="SEQ", help="the first call to draw (calls count from 1; default 1, or a little before --focus)")
    parser.add_argument("--count", type=at_least(1), metavar="N", help=f"how many calls to draw (default {DEFAULT_COUNT}, or {FOCUS_COUNT} with --focus)")
    parser.add_argument("--focus", type=at_least(1), metavar="SEQ", help="a failed call: draw only its domain's vCPUs, scrolled to it, with every band and call that names a frame of its error marked")
    parser.add_argument("--mfn", type=mfn_arg, action="append", default=[], metavar="MFN", help="with --focus, mark this frame too (repeatable); then the call need not have failed")
    parser.add_argument("--memory", action="store_true", help="with --focus, keep the loads and stores (folded away otherwise)")
    parser.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    first = args.first or (max(1, args.focus - FOCUS_BEFORE) if args.focus else 1)
    count = args.count or (FOCUS_COUNT if args.focus else DEFAULT_COUNT)
    with reading(args.trace):
        timeline = scan(read_trace(args.trace), first, count)
    note = ""
    if args.focus:
        try:
            timeline = focus(timeline, args.focus, args.memory, set(args.mfn))
        except ValueError as e:
            print(f"xensim timeline: {e}", file=sys.stderr)
            return 2
        hot = ", ".join(f"0x{m:x}" for m in sorted(timeline.hot_mfns)) or "no frame"
        naming = sum(1 for c in timeline.calls if c.mfns & timeline.hot_mfns)
        note = f"; focused on #{args.focus}: {hot} named in {naming} calls, {timeline.folded} loads and stores folded away"
    Path(args.html).write_text(render(timeline, Path(args.trace).name))
    print(f"{args.html}: calls {timeline.first}..{timeline.last} of {timeline.total}, {len(timeline.lanes)} vCPUs, {len(timeline.failures)} failed calls{note}")
    return 0


@dataclass
class Call:
    """One traced call as the page draws it."""

    seq: int
    lane: tuple | None  # (domid, vcpu), or None for the toolstack
    kinds: set = field(default_factory=set)
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    target: tuple | None = None  # the vCPU an IPI notifies
    multicall: bool = False
    mfns: set = field(default_factory=set)  # frames its arguments or errors name
    domid: int | None = None  # for a toolstack op: the domain it acts on

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if k in self.kinds or k == "other")


@dataclass
class Timeline:
    """What `scan` found: the calls in the window, the failed ones among them, the cr3 bands
    clipped to it, and every vCPU of the trace."""

    first: int
    last: int = 0
    total: int = 0
    calls: list[Call] = field(default_factory=list)
    bands: list[tuple] = field(default_factory=list)  # (lane, from seq, to seq, mfn)
    lanes: set = field(default_factory=set)
    failures: list[Call] = field(default_factory=list)
    focus: int | None = None  # the call --focus is about, and the frames its errors name
    hot_mfns: set = field(default_factory=set)
    folded: int = 0  # loads and stores left out by --focus
    address_sizes: dict = field(default_factory=dict)  # domid -> 64, or 32 (PAE: its cr3 is a PAE L3), from create_domain


class _Scanner:
    """Follows the state a timeline shows across the whole trace (cr3 per vCPU, which vCPU an
    IPI port notifies), so a window that starts mid-trace still draws it right."""

    def __init__(self, timeline: Timeline, count: int):
        self.t, self.count = timeline, count
        self.cr3: dict[tuple, tuple[int, int]] = {}  # lane -> (mfn, since seq)
        self.ports: dict[tuple[int, int], int] = {}  # (domid, port) -> vCPU it notifies
        self.stopped: dict[tuple, dict] = {}  # lane -> the arguments of the call it is in the middle of

    def in_window(self, seq: int) -> bool:
        return self.t.first <= seq < self.t.first + self.count

    def load_cr3(self, lane: tuple, mfn: int | None, seq: int) -> None:
        old = self.cr3.pop(lane, None)
        if old is not None:
            self._band(lane, old, seq)
        if mfn:
            self.cr3[lane] = (mfn, seq)

    def _band(self, lane: tuple, held: tuple[int, int], end: int) -> None:
        mfn, start = held
        start, end = max(start, self.t.first), min(end, self.t.first + self.count)
        if start < end:
            self.t.bands.append((lane, start, end, mfn))

    def finish(self) -> None:
        for lane, held in self.cr3.items():
            self._band(lane, held, self.t.total + 1)

    def record(self, seq: int, record: dict) -> None:
        """A record of a call that stopped part-way (preempted, see docs/preemption.md) is
        drawn as such; the call's entries are drawn with the record it ends in."""
        caller, op = record["caller"], record["op"]
        call = Call(seq, tuple(caller) if caller else None)
        args = self.stopped.pop(call.lane, None) if "resume" in record else record["args"]
        stop = record.get("result")
        if args is None:
            call.kinds.add("other")
            call.lines.append(f"{op} goes on with a call that began before the trace")
        elif isinstance(stop, dict) and "continuation" in stop:
            self.stopped[call.lane] = args
            call.kinds.add("other")
            call.lines.append(f"{op} stops part-way, goes on later: {json.dumps(stop['continuation'])}")
        elif caller is None:
            self._toolstack(call, op, args, record)
        elif op == "multicall":
            call.multicall = True
            results = record.get("result") or [{}] * len(args["calls"])  # none when the multicall itself failed
            call.lines.append(f"multicall of {len(args['calls'])}")
            for entry, result in zip(args["calls"], results):
                outcome = {"error": result} if "errno" in result else result
                self._hypercall(call, entry["op"], entry["args"], outcome, "  ")
            if "error" in record:
                self._failed(call, record["error"], "multicall")
        else:
            self._hypercall(call, op, args, record, "")
        for lane in (call.lane, call.target):
            if lane is not None:
                self.t.lanes.add(lane)
        if self.in_window(seq):
            self.t.calls.append(call)
            if call.errors:
                self.t.failures.append(call)

    def _toolstack(self, call: Call, op: str, args: dict, record: dict) -> None:
        result = record.get("result")
        if op == "deliver_upcall":  # the server's delivery to a vCPU: drawn on that vCPU
            call.lane = (args["domid"], args["vcpu"])
            call.kinds.add("upcall")
            call.lines.append(f"upcall delivered, pending ports {result}")
            return
        call.kinds.add("toolstack")
        call.lines.append(f"{op} {json.dumps(args)}")
        call.domid = args.get("domid", (result or {}).get("domid") if isinstance(result, dict) else None)
        if op == "create_domain" and result:
            domid = result["domid"]
            self.t.address_sizes[domid] = args.get("address_size", 64)
            self.t.lanes.update((domid, v) for v in range(args["nr_vcpus"]))
            self.load_cr3((domid, 0), result["start_info"]["pt_base_mfn"], call.seq)
        elif op == "destroy_domain" and "error" not in record:
            for lane in [lane for lane in self.cr3 if lane[0] == args["domid"]]:
                self.load_cr3(lane, None, call.seq)
        if "error" in record:
            self._failed(call, record["error"], op)

    def _hypercall(self, call: Call, op: str, args: dict, outcome: dict, indent: str) -> None:
        """One hypercall (or multicall entry) of `call`'s vCPU: its marks, its line in the
        tooltip, and what it changed that the timeline follows."""
        domid = call.lane[0]
        error = outcome.get("error")
        if op == "mmuext_op":
            done = error.get("done", 0) if error else len(args["ops"])
            for i, (cmd, arg1, _) in enumerate(args["ops"]):
                name = MMUEXT_NAMES.get(cmd, str(cmd))
                call.kinds.add("cr3" if "BASEPTR" in name else "unpin" if cmd == MmuextCmd.UNPIN_TABLE else "pin" if cmd in PIN_CMDS else "flush" if cmd in FLUSH_CMDS else "pte")
                call.lines.append(f"{indent}mmuext_op {name} 0x{arg1:x}" + ("" if i < done else "  (not done)"))
                if cmd in PIN_CMDS or cmd in MFN_ARG_CMDS:
                    call.mfns.add(arg1)
                if cmd == MmuextCmd.NEW_BASEPTR and i < done:
                    self.load_cr3(call.lane, arg1, call.seq)
        elif op == "event_channel_op":
            cmd = args["cmd"]
            if cmd == "send":
                call.kinds.add("ipi")
                target = self.ports.get((domid, args["port"]))
                call.target = (domid, target) if target is not None else None
                call.lines.append(f"{indent}event_channel_op send port {args['port']}" + (f" -> vCPU{target}" if target is not None else ""))
            else:
                call.kinds.add("evtchn")
                call.lines.append(f"{indent}event_channel_op {cmd} {json.dumps({k: v for k, v in args.items() if k != 'cmd'})}")
                if cmd in ("bind_ipi", "bind_virq") and not error:
                    self.ports[(domid, outcome["result"])] = args["vcpu"]
        elif op == "vcpu_op":
            call.kinds.add("sched")
            call.lines.append(f"{indent}vcpu_op {args['cmd']} vCPU{args['vcpuid']}")
            if args["cmd"] == "initialise" and not error:
                call.mfns.add(args["context"].get("ctrlreg3"))
                self.load_cr3((domid, args["vcpuid"]), args["context"].get("ctrlreg3"), call.seq)
                self.t.lanes.add((domid, args["vcpuid"]))
        elif op in MEMORY_OPS:
            result = outcome.get("result") or {}
            call.kinds.add("fault" if "fault" in result else "mem")
            where = f" va 0x{args['va']:x}" if "va" in args else ""
            call.lines.append(f"{indent}{op}{where}" + (f"  #PF {result['fault'].get('detail', '')}" if "fault" in result else ""))
        else:
            call.kinds.add({"mmu_update": "pte", "update_va_mapping": "pte", "sched_op": "sched", "set_timer_op": "sched"}.get(op, "other"))
            for ptr, val in args.get("reqs", ()):  # mmu_update: the table written and the frame its entry names
                call.mfns.update((ptr >> PAGE_SHIFT, (val & PTE_MFN_MASK) >> PAGE_SHIFT))
            if op == "update_va_mapping":
                call.mfns.add((args["val"] & PTE_MFN_MASK) >> PAGE_SHIFT)
            if op == "mmu_update":
                size = f" ({len(args['reqs'])} entries)"
            elif op == "vm_assist":  # enable writable_pagetables, not "0"
                size = f" {_VMASST_CMDS.get(args['cmd'], args['cmd'])} {VMASST_TYPE_NAMES.get(args['type'], args['type'])}"
            else:
                size = f" {args['cmd']}" if "cmd" in args else ""
            call.lines.append(f"{indent}{op}{size}")
        if error:
            self._failed(call, error, op)

    @staticmethod
    def _failed(call: Call, error: dict, op: str) -> None:
        call.kinds.add("error")
        call.errors.append(f"{op}: {error['errno']}: {error['message']}")
        call.mfns.update(named_mfns(error["message"]))


def named_mfns(message: str) -> set[int]:
    """The frames an error message names ("mfn 0x1fa0")."""
    return {int(m, 16) for m in re.findall(r"\bmfn (0x[0-9a-f]+)", message)}


def focus(timeline: Timeline, seq: int, memory: bool = False, mfns: set[int] = frozenset()) -> Timeline:
    """The part of `timeline` that explains call `seq`: its domain's vCPUs only, loads and
    stores folded away unless `memory` (the call itself stays), and the frames its errors
    name and `mfns` marked wherever a band or a call names them. The call must have failed
    unless `mfns` says what to mark (an audit finding or a corrupted page points at the call
    that last changed a frame, xensim.explain). ValueError if it is not a call of the window
    that qualifies."""
    call = next((c for c in (timeline.calls if mfns else timeline.failures) if c.seq == seq), None)
    if call is None:
        if mfns:
            raise ValueError(f"call #{seq} is not in calls {timeline.first}..{timeline.last}")
        raise ValueError(
            f"call #{seq} is not a failed call in calls {timeline.first}..{timeline.last}; the failed ones are {[c.seq for c in timeline.failures][:20]}"
            " (to focus on a call that did not fail, name the frames to mark with --mfn)"
        )
    domid = call.lane[0] if call.lane else call.domid
    lanes = {lane for lane in timeline.lanes if lane[0] == domid}
    mine = [c for c in timeline.calls if c.lane in lanes or c.target in lanes or c is call]
    kept = [c for c in mine if memory or c.kind != "mem" or c is call]
    hot = set(mfns).union(*(named_mfns(e) for e in call.errors))
    return Timeline(
        first=timeline.first,
        last=timeline.last,
        total=timeline.total,
        calls=kept,
        bands=[b for b in timeline.bands if b[0] in lanes],
        lanes=lanes,
        failures=[c for c in timeline.failures if c.lane in lanes],
        focus=seq,
        hot_mfns=hot,
        folded=len(mine) - len(kept),
        address_sizes=timeline.address_sizes,
    )


# A call, the header, the end record, a controlled run's step (not drawn, docs/schedule.md section 5).
_RECORD_KEYS = {"op", "xensim_trace", "digest", "sched"}


def scan(records, first: int = 1, count: int = DEFAULT_COUNT) -> Timeline:
    """Read a trace's (number, record) pairs (`read_trace`) into a Timeline of calls first ..
    first + count - 1."""
    timeline = Timeline(first=first)
    scanner = _Scanner(timeline, count)
    for number, record in records:
        if not isinstance(record, dict) or not record.keys() & _RECORD_KEYS:
            raise TraceError(f"record {number} is not a xensim trace record: {str(record)[:80]!r}")
        if "op" in record:
            timeline.total += 1
            scanner.record(timeline.total, record)
    scanner.finish()
    timeline.last = min(timeline.total, first + count - 1)
    return timeline


def _lane_name(lane: tuple | None) -> str:
    return XEN_LANE if lane is None else f"dom{lane[0]} vCPU{lane[1]}"


def _top(timeline: Timeline, lane: tuple | None) -> str:
    """What a lane's cr3 names: an L4, or a 32-bit domain's PAE L3 (docs/pv32.md section 2)."""
    if lane is None:
        return ""
    size = timeline.address_sizes.get(lane[0], 64)
    return level_name(MODES[size].root, size)


def render(timeline: Timeline, title: str) -> str:
    """The page: summary, legend, lanes and failed calls as HTML, the calls as JSON for the
    script that draws them."""
    # The toolstack's lane says nothing about one domain, unless the focused call is on it.
    toolstack = not timeline.focus or any(c.lane is None for c in timeline.calls)
    lanes = [*([None] if toolstack else []), *sorted(timeline.lanes)]
    index = {lane: i for i, lane in enumerate(lanes)}
    data = {
        "first": timeline.first,
        "last": timeline.last,
        "lanes": [_lane_name(lane) for lane in lanes],
        "tops": [_top(timeline, lane) for lane in lanes],
        "calls": [
            [
                c.seq,
                index[c.lane],
                c.kind,
                int(c.multicall),
                -1 if c.target is None else index[c.target],
                "\n".join([f"#{c.seq} {_lane_name(c.lane)}", *c.lines, *c.errors]),
                int(bool(c.mfns & timeline.hot_mfns)),
            ]
            for c in timeline.calls
        ],
        "bands": [[index[lane], start, end, mfn, int(mfn in timeline.hot_mfns)] for lane, start, end, mfn in timeline.bands],
        "focus": timeline.focus,
    }
    kinds = Counter(c.kind for c in timeline.calls)
    errnos = Counter(error.split(": ")[1] for c in timeline.failures for error in c.errors)
    failures = "".join(f'<tr data-seq="{c.seq}"><td>#{c.seq}</td><td>{_lane_name(c.lane)}</td><td>{html.escape(e)}</td></tr>' for c in timeline.failures for e in c.errors)
    in_multicalls = sum(len(c.errors) for c in timeline.failures if c.multicall)
    summary = f"calls {timeline.first}..{timeline.last} of {timeline.total}; {len(timeline.failures)} failed" + (
        f" ({', '.join(f'{e} x{n}' for e, n in errnos.most_common())}; {in_multicalls} of them multicall entries)" if errnos else ""
    )
    if timeline.focus:
        named = ", ".join(f"0x{m:x}" for m in sorted(timeline.hot_mfns)) or "no frame"
        summary += f"; focused on #{timeline.focus}: its domain only, {named} marked in red wherever a band or call names it, {timeline.folded} loads and stores folded away"
    legend = "".join(f'<label class="k-{k}"><input type="checkbox" checked data-kind="{k}"><i></i>{k} ({kinds[k]})</label>' for k in KINDS if kinds[k])
    page = PAGE.replace("@TITLE@", html.escape(title)).replace("@SUMMARY@", html.escape(summary)).replace("@LEGEND@", legend)
    bits = [" (32-bit)" if lane is not None and timeline.address_sizes.get(lane[0]) == 32 else "" for lane in lanes]
    page = page.replace("@LANES@", "".join(f"<div>{html.escape(name)}{suffix}</div>" for name, suffix in zip(data["lanes"], bits)))
    page = page.replace("@FAILURES@", failures or '<tr><td colspan="3">none</td></tr>')
    return page.replace("@DATA@", json.dumps(data, separators=(",", ":")).replace("</", "<\\/"))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xensim timeline: @TITLE@</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 12px; color: #222; }
h1 { font-size: 16px; margin: 0 0 4px; }
#bar { margin: 6px 0; display: flex; gap: 10px; align-items: center; flex-wrap: wrap; }
#bar label i { display: inline-block; width: 10px; height: 10px; margin: 0 3px; vertical-align: -1px; background: var(--c); }
#view { display: flex; border: 1px solid #ccc; }
#lanes { flex: none; padding-top: 22px; background: #f6f6f6; border-right: 1px solid #ccc; }
#lanes div { box-sizing: border-box; height: 34px; line-height: 33px; padding: 0 8px; white-space: nowrap; border-top: 1px solid #e4e4e4; }
#scroller { overflow-x: auto; flex: auto; }
svg text { font-size: 10px; fill: #666; } svg text.mfn { fill: #333; }
.k-error { --c: #d62728; } .k-cr3 { --c: #2ca02c; } .k-unpin { --c: #9467bd; } .k-pin { --c: #1f4e9c; }
.k-ipi { --c: #ff7f0e; } .k-upcall { --c: #f5b041; } .k-flush { --c: #17becf; } .k-pte { --c: #6a9fd8; }
.k-fault { --c: #bcbd22; } .k-sched { --c: #7f7f7f; } .k-evtchn { --c: #c49c94; } .k-toolstack { --c: #333; }
.k-mem { --c: #c8c8c8; } .k-other { --c: #999; }
svg line.ev { stroke: var(--c); }
svg line.focus { stroke-width: 6px; }
svg rect.hot { stroke: #d62728; stroke-width: 2px; } svg circle.hot { fill: #d62728; }
table { border-collapse: collapse; margin-top: 10px; }
td { padding: 2px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
#failures tr[data-seq] { cursor: pointer; color: #b00; }
</style></head><body>
<h1>xensim timeline: @TITLE@</h1>
<div>@SUMMARY@. x is the order of calls (traces have no clock); a band behind a lane is the page table the vCPU runs on (kernel cr3), coloured by mfn. Hover for details.</div>
<div id="bar">@LEGEND@ <span>zoom <input id="zoom" type="range" min="0" max="12" step="0.25" value="0"></span></div>
<div id="view"><div id="lanes">@LANES@</div><div id="scroller"><svg id="timeline" xmlns="http://www.w3.org/2000/svg"></svg></div></div>
<table id="failures"><tr><th colspan="3">failed calls (click to show)</th></tr>@FAILURES@</table>
<script type="application/json" id="data">@DATA@</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const LANE = 34, AXIS = 22, NS = "http://www.w3.org/2000/svg";
const svg = document.getElementById("timeline"), scroller = document.getElementById("scroller"), zoom = document.getElementById("zoom");
const span = D.last - D.first + 1;
const hidden = new Set();
function fit() { return Math.max(scroller.clientWidth - 4, 200) / Math.max(span, 1); }
function px() { return fit() * Math.pow(2, Number(zoom.value)); }
function add(name, attrs, title) {
  const node = document.createElementNS(NS, name);
  for (const key in attrs) node.setAttribute(key, attrs[key]);
  if (title) { const t = document.createElementNS(NS, "title"); t.textContent = title; node.appendChild(t); }
  svg.appendChild(node);
  return node;
}
function mfnColour(mfn) { return "hsl(" + Math.round((mfn * 137.508) % 360) + ",65%,55%)"; }
function tickStep(scale) {
  const raw = 90 / scale, unit = Math.pow(10, Math.floor(Math.log10(raw)));
  return [1, 2, 5, 10].map(m => m * unit).find(s => s >= raw);
}
function draw() {
  const scale = px(), width = Math.ceil(span * scale) + 2, height = AXIS + D.lanes.length * LANE;
  const x = seq => (seq - D.first) * scale;
  svg.replaceChildren();
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  D.lanes.forEach((name, i) => add("rect", {x: 0, y: AXIS + i * LANE, width: width, height: LANE, fill: i % 2 ? "#fafafa" : "#fff"}));
  const step = Math.max(1, tickStep(scale));
  for (let s = Math.ceil(D.first / step) * step; s <= D.last; s += step) {
    add("line", {x1: x(s), x2: x(s), y1: AXIS - 4, y2: height, stroke: "#eee"});
    add("text", {x: x(s) + 2, y: AXIS - 8}).textContent = "#" + s;
  }
  for (const [lane, from, to, mfn, hot] of D.bands) {
    const left = x(from), w = Math.max(x(to) - left, 1), top = AXIS + lane * LANE;
    add("rect", {x: left, y: top + 2, width: w, height: LANE - 4, fill: mfnColour(mfn), "fill-opacity": 0.25, class: hot ? "hot" : "band"},
        D.lanes[lane] + ": cr3 = mfn 0x" + mfn.toString(16) + " (" + D.tops[lane] + ") from #" + from + " to #" + (to - 1));
    for (let at = left; at < left + w - 50; at += 400) add("text", {x: at + 3, y: top + 12, class: "mfn"}).textContent = "cr3 " + D.tops[lane] + " 0x" + mfn.toString(16);
  }
  const thin = Math.max(1, Math.min(scale * 0.7, 3));
  for (const [seq, lane, kind, multicall, target, title, hot] of D.calls) {
    if (hidden.has(kind)) continue;
    const cx = x(seq) + scale / 2, top = AXIS + lane * LANE;
    const short = kind === "mem" || kind === "fault";
    const strong = kind === "error";
    if (target >= 0) add("line", {x1: cx, x2: cx, y1: top + LANE / 2, y2: AXIS + target * LANE + LANE / 2, class: "ev k-ipi", "stroke-dasharray": "3 2", "stroke-width": 1});
    add("line", {x1: cx, x2: cx, y1: top + (short ? LANE * 0.6 : 3), y2: top + LANE - 3, class: "ev k-" + kind, id: "c" + seq, "stroke-width": strong ? Math.max(3, thin) : thin}, title);
    if (multicall) add("line", {x1: cx - 2, x2: cx + 2, y1: top + 2, y2: top + 2, stroke: "#888", "stroke-width": 1.5});
    if (hot) add("circle", {cx: cx, cy: top + 4, r: 3, class: "hot"}, title);
    if (strong) add("line", {x1: cx, x2: cx, y1: AXIS, y2: height, class: "ev k-error", "stroke-opacity": 0.35, "stroke-width": 1});
  }
}
function show(seq) {
  zoom.value = Math.min(12, Math.max(0, Math.log2(12 / fit())));
  draw();
  scroller.scrollLeft = (seq - D.first) * px() - scroller.clientWidth / 2;
  const mark = document.getElementById("c" + seq);
  if (mark) mark.classList.add("focus");
}
zoom.addEventListener("input", () => {
  const centre = (scroller.scrollLeft + scroller.clientWidth / 2) / px();
  draw();
  scroller.scrollLeft = centre * px() - scroller.clientWidth / 2;
});
for (const box of document.querySelectorAll("#bar input[data-kind]"))
  box.addEventListener("change", () => { box.checked ? hidden.delete(box.dataset.kind) : hidden.add(box.dataset.kind); draw(); });
for (const row of document.querySelectorAll("#failures tr[data-seq]"))
  row.addEventListener("click", () => show(Number(row.dataset.seq)));
window.addEventListener("resize", draw);
draw();
if (location.hash.startsWith("#c")) show(Number(location.hash.slice(2)));
else if (D.focus) show(D.focus);
</script></body></html>
"""
