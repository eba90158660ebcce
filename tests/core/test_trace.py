"""Trace and replay: a recorded run re-executes to the same results and the same state."""

import io
import json

from hypervisor.core import Continuation, Hypervisor, XenError
from hypervisor.core.abi import ENTRIES_PER_TABLE, MmuextCmd
from hypervisor.core.trace import TraceWriter, replay, state_digest
from xensim.cli import main

from .guest import Guest


def record_a_run() -> tuple[str, str]:
    hv = Hypervisor(nr_frames=1 << 13)
    out = io.StringIO()
    writer = TraceWriter(hv, out)
    hv.tracer = writer
    guest, other = Guest(hv), Guest(hv)
    tree = guest.new_pgd({0x400000: guest.alloc()[1]})
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    guest.unpin(tree["l4"])
    try:
        guest.make_writable(tree["pfns"][0])  # the race's -EBUSY is part of the record
    except XenError:
        pass
    guest.call("multicall", calls=[{"op": "mmuext_op", "args": {"ops": [[3, other.l4, 0]]}}])
    hv.toolstack("destroy_domain", domid=other.domid)
    writer.close()
    return out.getvalue(), state_digest(hv)


def test_replay_reproduces_every_result_and_the_final_state():
    trace, digest = record_a_run()
    assert '"errno":"EBUSY"' in trace
    report, hv = replay(trace.splitlines())
    assert report.ok and report.calls == 17 and report.digest_matched
    assert state_digest(hv) == digest


def test_replay_reports_a_result_that_differs():
    trace, _ = record_a_run()
    lines = trace.splitlines()
    i = next(i for i, line in enumerate(lines) if '"errno":"EBUSY"' in line)
    record = json.loads(lines[i])
    del record["error"]
    record["result"] = 1
    lines[i] = json.dumps(record)
    report, _ = replay(lines)
    assert not report.ok and len(report.mismatches) == 1 and "EBUSY" in report.mismatches[0]


def test_replay_command(tmp_path, capsys):
    trace, _ = record_a_run()
    path = tmp_path / "run.jsonl"
    path.write_text(trace)
    assert main(["replay", str(path)]) == 0
    assert "0 mismatches, final state matches, 0 audit findings" in capsys.readouterr().out


def test_replay_of_preempted_calls_goes_on_where_the_run_went_on():
    """Each run of a continued call is its own record (as Xen's re-issued hypercall is a call
    of its own), with other domains' calls between them; the replay stops at the same points
    because the budget is in the header, and ends in the same state."""
    hv = Hypervisor(nr_frames=1 << 14, preempt_work=2 * ENTRIES_PER_TABLE)
    out = io.StringIO()
    writer = TraceWriter(hv, out)
    hv.tracer = writer
    guest, other = Guest(hv, nr_pages=4096), Guest(hv)
    guest.leave_boot_tree()
    pin, unpin = MmuextCmd.PIN_L4_TABLE, MmuextCmd.UNPIN_TABLE

    def go_on_between_other_calls(answer) -> None:
        while isinstance(answer, Continuation):
            other.mmuext((MmuextCmd.TLB_FLUSH_LOCAL,))
            try:
                answer = hv.resume(guest.domid, 0, answer)
            except XenError:
                return

    go_on_between_other_calls(guest.mmuext((pin, guest.l4), (unpin, guest.l4), (pin, guest.l4), (pin, other.l4)))
    go_on_between_other_calls(guest.call("multicall", calls=[{"op": "mmuext_op", "args": {"ops": [[unpin, guest.l4, 0]]}}]))
    writer.close()
    trace = out.getvalue()
    assert trace.count('"resume":') >= 4 and '"continuation":{"op":"multicall","start":0,"inner":{"op":"mmuext_op","outcome":"result"}}' in trace
    report, replayed = replay(trace.splitlines())
    assert report.ok and report.digest_matched and state_digest(replayed) == state_digest(hv)
