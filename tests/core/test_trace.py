"""Trace and replay: a recorded run re-executes to the same results and the same state."""

import base64
import io
import json
import os
import pickle
import zlib

import pytest

from hypervisor.core import Continuation, Hypervisor, XenError
from hypervisor.core.abi import ENTRIES_PER_TABLE, Errno, MmuextCmd
from hypervisor.core.trace import FORMAT, TraceError, TraceWriter, replay, restore, snapshot, state_digest
from xensim.cli import main

from .guest import Guest


def record_a_run() -> tuple[str, str]:
    hv = Hypervisor(nr_frames=1 << 13)
    out = io.StringIO()
    writer = TraceWriter(hv, out)
    hv.tracer = writer
    guest, other = Guest(hv, ticking=True), Guest(hv, ticking=True)  # their periodic timers run, and replay alike
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
    assert report.ok and report.calls == 19 and report.digest_matched
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


def test_every_prefix_of_a_trace_replays_as_a_prefix():
    """A trace read while it is written, or cut by a crash, is the run so far: each whole
    record replays, a last line cut half-way is skipped, and the final state is not compared."""
    lines = record_a_run()[0].splitlines(keepends=True)
    for end in range(1, len(lines)):
        for cut in ("", lines[end][: len(lines[end]) // 2]):
            report, _ = replay([*lines[:end], cut] if cut else lines[:end])
            assert report.ok and not report.mismatches and report.calls == end - 1
            assert report.digest_matched is None and (report.cut_line == end + 1) == bool(cut)


def test_a_trace_started_mid_run_replays_from_its_snapshot():
    hv = Hypervisor(nr_frames=1 << 13)
    guest, other = Guest(hv), Guest(hv)
    tree = guest.new_pgd({0x400000: guest.alloc()[1]})
    guest.pin(4, tree["l4"])
    port = guest.evtchn("bind_ipi", vcpu=1)
    hv.toolstack("destroy_domain", domid=other.domid)

    out = io.StringIO()
    hv.tracer = writer = TraceWriter(hv, out)  # everything above is only in the snapshot
    guest.evtchn("send", port=port)
    guest.new_baseptr(tree["l4"], vcpu=1)
    guest.unpin(tree["l4"])
    created = hv.toolstack("create_domain", nr_pages=64)
    writer.close()

    report, replayed = replay(out.getvalue().splitlines())
    assert report.ok and report.snapshot and report.calls == 4 and report.digest_matched
    assert replayed.domains.keys() == hv.domains.keys() and created["domid"] == other.domid + 1
    assert state_digest(replayed) == state_digest(hv)


def test_a_snapshot_loads_only_the_cores_own_objects():
    """A snapshot is a pickle: replay refuses one that names anything but the core's classes
    and functions, numpy arrays and collections, so a crafted trace cannot run code."""

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch /tmp/xensim-exploited",))

    header = {"xensim_trace": FORMAT, "snapshot": base64.b64encode(zlib.compress(pickle.dumps(Exploit()))).decode()}
    with pytest.raises(TraceError, match="line 1: the snapshot names posix.system, which is not part of the core"):
        replay([json.dumps(header)])


@pytest.mark.parametrize(
    "lines, says",
    [
        ([], "empty: not a xensim trace"),
        (["\x00\x01garbage"], "line 1 is not a xensim trace header"),
        (['{"caller":null,"op":"xen_version","args":{}}'], "line 1 is not a xensim trace header"),
        (['{"xensim_trace":99}'], "trace format 99; this xensim reads formats 1 and 2"),
        (['{"xensim_trace":1,"nr_frames":8192}', "garbage", '{"digest":"0"}'], "line 2 is not a trace record"),
        (['{"xensim_trace":1,"nr_frames":8192}', '{"op":"xen_version"}', '{"digest":"0"}'], "line 2 is not a trace record"),
        (['{"xensim_trace":1,"nr_frames":8192}', '{"digest":"0"}', '{"digest":"0"}'], "line 3 follows the trace's end record"),
    ],
)
def test_replay_of_what_is_not_a_trace_is_one_clear_error(lines, says):
    with pytest.raises(TraceError) as caught:
        replay(lines)
    assert says in str(caught.value) and "\n" not in str(caught.value)


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


def test_a_trace_started_inside_a_preempted_call_goes_on_with_it():
    """The call a vCPU is in when tracing starts is parked in the core (Vcpu.continuation), so
    the snapshot holds it and the trace's "resume" records go on from it."""
    hv = Hypervisor(nr_frames=1 << 14, preempt_work=2 * ENTRIES_PER_TABLE)
    guest = Guest(hv, nr_pages=4096)
    guest.leave_boot_tree()
    answer = guest.mmuext((MmuextCmd.PIN_L4_TABLE, guest.l4))
    assert isinstance(answer, Continuation)

    out = io.StringIO()
    hv.tracer = writer = TraceWriter(hv, out)  # the call so far is only in the snapshot
    while isinstance(answer, Continuation):
        answer = hv.resume(guest.domid, 0, answer)
    writer.close()

    trace = out.getvalue()
    assert answer == 1 and '"resume":' in trace
    report, replayed = replay(trace.splitlines())
    assert report.ok and report.snapshot and report.digest_matched, report.mismatches
    assert state_digest(replayed) == state_digest(hv)


def test_a_snapshot_holds_a_parked_continuation_with_everything_it_carries():
    """What a continuation may hold when a snapshot is taken: arguments with bytes, a
    multicall's results so far, the inner continuation of the entry it stopped in, and an
    answer held back until the vCPU's teardown is over, a XenError with its done count."""
    hv = Hypervisor(nr_frames=1 << 12)
    guest = Guest(hv, nr_pages=256)
    held = XenError(Errno.EINVAL, "mmuext_op entry 3: why", index=3, done=3)
    inner = Continuation("mmuext_op", {"ops": [[0, 0, 0]]}, outcome=("error", held))
    parked = Continuation("multicall", {"calls": [{"op": "write", "args": {"data": b"\x01"}}]}, {"start": 1, "results": [{"result": 1}], "inner": inner})
    guest.domain.vcpus[0].continuation = parked

    loaded = restore(snapshot(hv)).domains[guest.domid].vcpus[0].continuation
    assert loaded.summary() == parked.summary() and loaded.args == parked.args
    error = loaded.at["inner"].outcome[1]
    assert (type(error), error.errno, error.message, error.index, error.done) == (XenError, Errno.EINVAL, held.message, 3, 3)
