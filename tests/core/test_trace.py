"""Trace and replay: a recorded run re-executes to the same results and the same state."""

import base64
import io
import json
import os
import pickle
import random
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.core import Continuation, Hypervisor, XenError
from hypervisor.core.abi import ENTRIES_PER_TABLE, Errno, MmuextCmd
from hypervisor.core.trace import FORMAT, Records, TraceError, TraceWriter, dumps, frame, replay, restore, snapshot, state_digest
from xensim.cli import main

from .guest import Guest


def records(trace: bytes) -> list:
    """The records of a trace, header first."""
    return [record for _, record in Records(io.BytesIO(trace))]


def rewritten(trace: bytes, records: list) -> bytes:
    """A trace with the header line of `trace` and these records after it."""
    return trace[: trace.index(b"\n") + 1] + b"".join(map(frame, records))


def frame_ends(trace: bytes) -> list[int]:
    """Where each part of a trace ends: the header line, then each record's frame."""
    ends = [trace.index(b"\n") + 1]
    while ends[-1] < len(trace):
        ends.append(ends[-1] + 4 + struct.unpack_from("<I", trace, ends[-1])[0])
    return ends


def record_a_run() -> tuple[bytes, str]:
    hv = Hypervisor(nr_frames=1 << 13)
    out = io.BytesIO()
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
    assert any(r.get("error", {}).get("errno") == "EBUSY" for r in records(trace))
    report, hv = replay(io.BytesIO(trace))
    assert report.ok and report.calls == 21 and report.digest_matched  # each Guest enables writable_pagetables at boot
    assert state_digest(hv) == digest


def test_replay_reports_a_result_that_differs():
    trace, _ = record_a_run()
    changed = records(trace)[1:]
    record = next(r for r in changed if r.get("error", {}).get("errno") == "EBUSY")
    del record["error"]
    record["result"] = 1
    report, _ = replay(io.BytesIO(rewritten(trace, changed)))
    assert not report.ok and len(report.mismatches) == 1 and "EBUSY" in report.mismatches[0]


def test_replay_command(tmp_path, capsys):
    trace, _ = record_a_run()
    path = tmp_path / "run.trace"
    path.write_bytes(trace)
    assert main(["replay", str(path)]) == 0
    assert "0 mismatches, final state matches, 0 audit findings" in capsys.readouterr().out


def test_every_prefix_of_a_trace_replays_as_a_prefix():
    """A trace read while it is written, or cut by a crash, is the run so far: each whole
    record replays, a last record cut anywhere (in its length or its pickle) is skipped, and
    the final state is not compared."""
    trace = record_a_run()[0]
    ends = frame_ends(trace)
    for whole, end in enumerate(ends[:-1]):
        for cut in (0, 1, 4, (ends[whole + 1] - end) // 2 + 2, ends[whole + 1] - end - 1):
            report, _ = replay(io.BytesIO(trace[: end + cut]))
            assert report.ok and not report.mismatches and report.calls == whole
            assert report.digest_matched is None and (report.cut_line == whole + 2) == bool(cut)


def test_a_trace_started_mid_run_replays_from_its_snapshot():
    hv = Hypervisor(nr_frames=1 << 13)
    guest, other = Guest(hv), Guest(hv)
    tree = guest.new_pgd({0x400000: guest.alloc()[1]})
    guest.pin(4, tree["l4"])
    port = guest.evtchn("bind_ipi", vcpu=1)
    hv.toolstack("destroy_domain", domid=other.domid)

    out = io.BytesIO()
    hv.tracer = writer = TraceWriter(hv, out)  # everything above is only in the snapshot
    guest.evtchn("send", port=port)
    guest.new_baseptr(tree["l4"], vcpu=1)
    guest.unpin(tree["l4"])
    created = hv.toolstack("create_domain", nr_pages=64)
    writer.close()

    report, replayed = replay(io.BytesIO(out.getvalue()))
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
        replay(io.BytesIO(json.dumps(header).encode() + b"\n"))


HEADER = b'{"xensim_trace":3,"nr_frames":8192}\n'


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/xensim-exploited",))


@pytest.mark.parametrize(
    "trace, says",
    [
        (b"", "empty: not a xensim trace"),
        (b"\x00\x01garbage", "line 1 is not a xensim trace header"),
        (b'{"caller":null,"op":"xen_version","args":{}}\n', "line 1 is not a xensim trace header"),
        (b"[" * 100_000 + b"\n", "line 1 is not a xensim trace header"),
        (b'{"xensim_trace":99}\n', "trace format 99; this xensim reads formats 1, 2, 3"),
        (b'{"xensim_trace":1,"nr_frames":8192}\ngarbage\n{"digest":"0"}\n', "line 2 is not a trace record"),
        (b'{"xensim_trace":1,"nr_frames":8192}\n{"op":"xen_version"}\n{"digest":"0"}\n', "record 2 is not a trace record"),
        (b'{"xensim_trace":1,"nr_frames":8192}\n{"digest":"0"}\n{"digest":"0"}\n', "record 3 follows the trace's end record"),
        (HEADER + frame({"op": "xen_version"}) + frame({"digest": "0"}), "record 2 is not a trace record"),
        (HEADER + frame({"digest": "0"}) + frame({"digest": "0"}), "record 3 follows the trace's end record"),
        (HEADER + struct.pack("<I", 5) + b"\xff" * 5 + frame({"digest": "0"}), "record 2 is damaged"),
        (HEADER + struct.pack("<I", 1 << 30) + b"\0" * 64, "record 2 is damaged: its length, 1073741824 bytes, is not what follows it"),
        (HEADER + frame({"digest": "0"})[:-2] + frame({"digest": "0"}), "record 2 is damaged"),
        (HEADER + struct.pack("<I", len(pickle.dumps(Exploit()))) + pickle.dumps(Exploit()), "record 2 is damaged: it names posix.system; a record holds plain values only"),
    ],
)
def test_replay_of_what_is_not_a_trace_is_one_clear_error(trace, says):
    with pytest.raises(TraceError) as caught:
        replay(io.BytesIO(trace))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_replay_of_preempted_calls_goes_on_where_the_run_went_on():
    """Each run of a continued call is its own record (as Xen's re-issued hypercall is a call
    of its own), with other domains' calls between them; the replay stops at the same points
    because the budget is in the header, and ends in the same state."""
    hv = Hypervisor(nr_frames=1 << 14, preempt_work=2 * ENTRIES_PER_TABLE)
    out = io.BytesIO()
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
    trace = records(out.getvalue())
    assert sum("resume" in r for r in trace) >= 4
    assert {"continuation": {"op": "multicall", "start": 0, "inner": {"op": "mmuext_op", "outcome": "result"}}} in [r.get("result") for r in trace]
    report, replayed = replay(io.BytesIO(out.getvalue()))
    assert report.ok and report.digest_matched and state_digest(replayed) == state_digest(hv)


def test_a_trace_started_inside_a_preempted_call_goes_on_with_it():
    """The call a vCPU is in when tracing starts is parked in the core (Vcpu.continuation), so
    the snapshot holds it and the trace's "resume" records go on from it."""
    hv = Hypervisor(nr_frames=1 << 14, preempt_work=2 * ENTRIES_PER_TABLE)
    guest = Guest(hv, nr_pages=4096)
    guest.leave_boot_tree()
    answer = guest.mmuext((MmuextCmd.PIN_L4_TABLE, guest.l4))
    assert isinstance(answer, Continuation)

    out = io.BytesIO()
    hv.tracer = writer = TraceWriter(hv, out)  # the call so far is only in the snapshot
    while isinstance(answer, Continuation):
        answer = hv.resume(guest.domid, 0, answer)
    writer.close()

    assert answer == 1 and any("resume" in r for r in records(out.getvalue()))
    report, replayed = replay(io.BytesIO(out.getvalue()))
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


# -- format 3: what is stored, and how -------------------------------------------------------

PAYLOADS = [bytes(range(256)) * 16, bytes(random.Random(3).randbytes(4096)), b"\n\r\x00" * 5, b"\x80"]


def record_reads_and_writes() -> tuple[bytes, Hypervisor, list[int]]:
    """Each payload written to a page of its own and read back (alone and in a multicall)."""
    hv = Hypervisor(nr_frames=1 << 12)
    out = io.BytesIO()
    hv.tracer = writer = TraceWriter(hv, out)
    guest = Guest(hv, nr_pages=256)
    vas = [guest.direct_va(guest.alloc()[0]) for _ in PAYLOADS]
    for va, data in zip(vas, PAYLOADS):
        assert guest.access("write", va=va, data=data) is None
        assert guest.access("read", va=va, length=len(data)) == data
    reads = [{"op": "read", "args": {"va": va, "length": len(data)}} for va, data in zip(vas, PAYLOADS)]
    assert guest.call("multicall", calls=reads) == [{"result": {"data": data}} for data in PAYLOADS]
    writer.close()
    return out.getvalue(), hv, vas


def test_a_trace_stores_written_bytes_as_they_are_and_read_bytes_as_their_checksum():
    """Payloads are bytes in the file, not hex; what a read returns is not stored, only its
    length and CRC-32, which replay checks against what it reads itself."""
    trace, hv, _ = record_reads_and_writes()
    calls = [r for r in records(trace) if "op" in r]
    written = [r["args"]["data"] for r in calls if r["op"] == "write"]
    assert written == PAYLOADS and all(type(data) is bytes for data in written)
    checksums = [{"data": {"crc32": zlib.crc32(data), "len": len(data)}} for data in PAYLOADS]
    assert [r["result"] for r in calls if r["op"] == "read"] == checksums
    assert next(r["result"] for r in calls if r["op"] == "multicall") == [{"result": c} for c in checksums]
    assert len(trace) < sum(map(len, PAYLOADS)) + 4096  # each payload once, in binary, plus the records around it
    assert PAYLOADS[1] in trace and PAYLOADS[1].hex().encode() not in trace
    report, replayed = replay(io.BytesIO(trace))
    assert report.ok and report.digest_matched and state_digest(replayed) == state_digest(hv)


def test_a_read_that_gives_other_contents_on_replay_is_a_mismatch():
    trace, _, _ = record_reads_and_writes()
    changed = records(trace)[1:]
    read = next(r for r in changed if r.get("op") == "read")
    read["result"]["data"]["crc32"] ^= 1
    report, _ = replay(io.BytesIO(rewritten(trace, changed)))
    assert len(report.mismatches) == 1 and "(read): recorded" in report.mismatches[0]


plain = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | st.text() | st.binary(max_size=5000),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(args=st.dictionaries(st.text(max_size=8), plain, max_size=5))
def test_the_encoding_round_trips_arguments_exactly(args):
    """Arguments are stored as they are: bytes of any length and content, big integers, text."""
    record = {"caller": [1, 0], "op": "write", "args": args, "result": {}}
    (number, decoded), *rest = list(Records(io.BytesIO(HEADER + frame(record))))[1:]
    assert (number, decoded, rest) == (2, record, [])


def test_an_enum_in_a_record_is_stored_as_its_value():
    """A record names no class: a loader that takes none can read it."""
    record = {"caller": None, "op": "x", "args": {"cmd": MmuextCmd.PIN_L4_TABLE, "ops": ((1, 2, 3),)}, "result": Errno.EBUSY}
    decoded = records(HEADER + frame(record))[1]
    assert decoded == {"caller": None, "op": "x", "args": {"cmd": int(MmuextCmd.PIN_L4_TABLE), "ops": [[1, 2, 3]]}, "result": Errno.EBUSY.value}
    assert type(decoded["args"]["cmd"]) is int


def test_a_format_2_trace_of_json_lines_with_hex_still_replays():
    """The format before this one, JSON lines with bytes as {"hex": ...} (read back in full),
    is still read: replay, timeline, explain and export take either."""
    hv = Hypervisor(nr_frames=1 << 12)
    lines = [json.dumps({"xensim_trace": 2, "nr_frames": hv.nr_frames, "strict_tlb": False, "preempt_work": hv.budget.per_call})]
    hv.tracer = lambda record: lines.append(dumps(record))
    guest = Guest(hv, nr_pages=256)
    va = guest.direct_va(guest.alloc()[0])
    guest.access("write", va=va, data=PAYLOADS[1])
    assert guest.access("read", va=va, length=4096) == PAYLOADS[1]
    lines.append(json.dumps({"digest": state_digest(hv)}))
    assert sum(PAYLOADS[1].hex() in line for line in lines) == 2
    report, replayed = replay(io.BytesIO("\n".join(lines).encode() + b"\n"))
    assert report.ok and report.digest_matched and report.calls == len(lines) - 2
