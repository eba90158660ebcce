"""`xensim trace explain` and the explanations stress and demo print: the failed call's
number, the vCPUs involved, who held the frames its error names at that moment (the trace
replayed up to it), and the command that opens the focused timeline; for an audit finding or
a page that read back wrong, the call that last changed each frame it names, and who held the
frame when the finding was made."""

import io
import json
import shlex

import pytest

from guestlib.kernel.mm import describe_corruption, pattern
from hypervisor.core import Hypervisor, audit, views
from hypervisor.core.abi import ENTRIES_PER_TABLE, PAGE_SIZE, MmuextCmd, PageType
from hypervisor.core.frames import FrameTable
from hypervisor.core.trace import TraceWriter
from tests.server.helpers import RW, A, D, P, WireGuest
from tests.support.server import start_server
from xensim.cli import main
from xensim.explain import CORRUPTION, explain, explain_corruption, explain_run
from xensim.launch import run, xensim_command
from xensim.stress import named_problems
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .core.guest import Guest
from .test_timeline import pae_server_trace, race_trace


def test_the_ebusy_is_explained_by_the_vcpu_still_on_the_table(tmp_path):
    trace, run = race_trace()
    path = tmp_path / "run.trace"
    path.write_bytes(trace)
    first, second = explain(str(path))  # the EBUSY and the multicall's EINVAL
    d = run["domid"]
    busy = first["data"]
    assert "EBUSY" in busy["errors"][0] and busy["caller"] == f"dom{d} vCPU0"
    assert busy["vcpus"] == [f"dom{d} vCPU0", f"dom{d} vCPU1"]
    (l4,) = [f for f in busy["frames"] if f["frame"]["mfn"] == hex(run["l4"])]
    # At that moment: unpinned, its one type reference vCPU 1's base pointer.
    assert l4["bases"] == [{"domid": d, "vcpu": 1, "base": "kernel"}] and not l4["frame"]["pinned"]
    assert l4["type_holders"]["base pointers"] == 1 == l4["frame"]["type_count"]
    assert busy["timeline"] == f"xensim timeline {path} --html focus-{busy['seq']}.html --focus {busy['seq']}"
    assert "multicall" not in busy["errors"][0] and second["data"]["seq"] > busy["seq"]
    # By the end of the run vCPU 1 had left: only a replay to the failure shows the holder.
    assert main(["trace", "explain", str(path), "--seq", str(busy["seq"])]) == 0


def test_a_report_picks_its_failure_by_the_message_it_quotes(tmp_path, capsys):
    trace, run = race_trace()
    path = tmp_path / "run.trace"
    path.write_bytes(trace)
    einval = explain(str(path))[1]["data"]["errors"][0]
    message = einval.split(": ", 2)[2]
    (only,) = explain(str(path), matching=[f"kernel BUG on vCPU 0 in somewhere: -EINVAL from multicall: {message}", "an unrelated report"])
    assert only["data"]["errors"] == [einval]
    assert main(["trace", "explain", str(path), "--seq", "1"]) == 0 and capsys.readouterr().out.strip() == "no failed calls"


@pytest.mark.timeout(200)
def test_stress_explains_its_kernel_bugs(tmp_path):
    trace = tmp_path / "stress.trace"
    done = run(xensim_command("stress", "--domains", "1", "--vcpus", "4", "--seconds", "4", "--variant", "none", "--trace", str(trace)), timeout=180)
    assert done.returncode == 1 and "kernel BUG: " in done.stdout, done.stdout + done.stderr
    assert "  vCPUs involved: dom1 vCPU" in done.stdout and "base pointer (cr3) of dom1 vCPU" in done.stdout
    assert f"  see it: xensim timeline {trace} --html focus-" in done.stdout


def test_a_multicall_that_went_on_part_way_is_explained_by_its_own_entries(tmp_path):
    """A preempted call goes on in records of their own, with "resume" in place of "args"
    (docs/preemption.md): its failed entries are those of the call it began as."""
    hv = Hypervisor(nr_frames=1 << 14, preempt_work=2 * ENTRIES_PER_TABLE)
    guest, other = Guest(hv, nr_pages=4096), Guest(hv)
    guest.leave_boot_tree()
    out = io.BytesIO()
    hv.tracer = writer = TraceWriter(hv, out)
    pins = [{"op": "mmuext_op", "args": {"ops": [[MmuextCmd.PIN_L4_TABLE, l4, 0]]}} for l4 in (guest.l4, other.l4)]
    results, stops = guest.go_on(guest.call("multicall", calls=pins))
    writer.close()
    assert stops and results[0] == {"result": 1} and results[1]["errno"] == "EINVAL"
    path = tmp_path / "run.trace"
    path.write_bytes(out.getvalue())
    (only,) = explain(str(path))
    assert only["data"]["errors"] == [f"mmuext_op: EINVAL: {results[1]['message']}"]
    assert only["data"]["caller"] == f"dom{guest.domid} vCPU0"


def run_timeline(command: str, tmp_path) -> int:
    """Run a `see it:` command, with its page written under tmp_path."""
    words = shlex.split(command)
    assert words[:2] == ["xensim", "timeline"]
    words[words.index("--html") + 1] = str(tmp_path / "focus.html")
    return main(words[1:])


@pytest.mark.timeout(120)
def test_a_page_read_through_a_stale_tlb_entry_is_explained_by_the_frame_it_came_from(tmp_path, capsys):
    """vCPU 1 caches a page's translation; vCPU 0 moves the page to another frame flushing
    only its own TLB, and writes its data there; vCPU 1 reads the old frame's data. The
    oracle's report names the frame the L1 entry maps; the explanation finds the read in the
    trace (of the reads that returned that data, the one made while the tables mapped the page
    to that frame), the stale frame the read used, whose TLB still held it, and the calls that
    last changed each frame."""
    path = tmp_path / "run.trace"
    with start_server("--trace", str(path)) as server:
        guest = WireGuest(server)
        guest.bring_up(1)
        (pfn, old), (_, new) = guest.alloc(), guest.alloc()
        va = guest.direct_va(pfn)
        before, wrote = pattern(7, 3, 0x77), pattern(5, 3, 0x55)
        guest.call("Write", m.WriteRequest(va=va, data=before))
        assert guest.call("Read", m.ReadRequest(va=va, length=PAGE_SIZE), vcpu=1).data == before  # vCPU 1 caches va -> old
        guest.call("UpdateVaMapping", h.UpdateVaMappingRequest(va=va, val=(new << 12) | P | RW | A | D, flags=2))  # UVMF_INVLPG, local only
        guest.call("Write", m.WriteRequest(va=va, data=wrote))
        assert guest.call("Read", m.ReadRequest(va=va, length=PAGE_SIZE), vcpu=1).data == before  # the stale frame
        # Later the page goes back to its old frame, and the same read returns the same data,
        # rightly: not the read the report is about, though it is the last that matches.
        guest.call("UpdateVaMapping", h.UpdateVaMappingRequest(va=va, val=(old << 12) | P | RW | A | D, flags=2))
        assert guest.call("Read", m.ReadRequest(va=va, length=PAGE_SIZE), vcpu=1).data == before
        guest.toolstack("StopTrace", t.StopTraceRequest())
    d = guest.domid
    report = f"dom{d} " + describe_corruption(1, 5, 0x55, 3, va, (new << 12) | P | RW, before)
    assert CORRUPTION.search(report)  # the oracle's words and the reader's pattern agree

    explained = explain_corruption(str(path), report)
    data = explained["data"]
    assert data["read_from"] == hex(old) and [f["frame"]["mfn"] for f in data["frames"]] == [hex(new), hex(old)]
    mapped, stale = data["frames"]
    assert stale["tlbs"] == [{"domid": d, "vcpu": 1, "vas": [hex(va)]}]
    assert f"dom{d} vCPU0 update_va_mapping" in stale["last_changed"]["call"]  # the remap dropped its mapping
    assert f"dom{d} vCPU0 write" in mapped["last_changed"]["call"] and mapped["last_changed"]["seq"] == data["read"] - 1
    assert data["vcpus"] == [f"dom{d} vCPU1", f"dom{d} vCPU0"] and data["seq"] == mapped["last_changed"]["seq"]
    assert f"the read used mfn {hex(old)}, which its TLB still held (stale)" in explained["text"]
    assert f"in the TLB of dom{d} vCPU 1 (va {hex(va)})" in explained["text"]
    assert data["timeline"].endswith(f"--focus {data['seq']} --mfn {hex(new)} --mfn {hex(old)}")
    assert run_timeline(data["timeline"], tmp_path) == 0  # a call that did not fail, focused with the frames to mark
    assert f'"focus":{data["seq"]}' in (tmp_path / "focus.html").read_text()
    capsys.readouterr()
    assert main(["trace", "explain", str(path), "--corruption", report, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [data]
    assert main(["trace", "explain", str(path), "--corruption", f"dom{d} vCPU 1 read garbage"]) == 2
    assert capsys.readouterr().err.startswith(f"xensim trace: no read in {path} matches ")


def test_an_audit_finding_points_at_the_call_that_last_changed_its_frame(tmp_path, monkeypatch, capsys):
    """A bug of the simulator injected into the core: an unpin that forgets to drop the pin's
    references. The audit finds the counts wrong, before the domain is destroyed (per domain)
    and after (the frame quarantined); the explanation names the unpin as the last call that
    changed the frame, and shows the frame as the audit saw it."""
    put = FrameTable.put_page_and_type
    forgets = lambda frames, mfn, *a: None if frames.type[mfn] == PageType.L1 and not frames.is_pinned(mfn) else put(frames, mfn, *a)  # noqa: E731
    monkeypatch.setattr(FrameTable, "put_page_and_type", forgets)  # while the run is recorded and while it is replayed
    hv = Hypervisor(nr_frames=1 << 14)
    out = io.BytesIO()
    hv.tracer = writer = TraceWriter(hv, out)
    guest = Guest(hv)
    pfn, l1 = guest.new_table()
    guest.make_readonly(pfn)
    guest.pin(1, l1)
    guest.unpin(l1, vcpu=1)
    unpin = hv.stats.total()
    guest.call("xen_version")
    domain_findings = audit(hv)
    assert any(f"mfn {l1:#x}" in f for f in domain_findings)
    hv.toolstack("destroy_domain", domid=guest.domid)
    machine_findings = audit(hv)
    assert views.host_info(hv)["quarantined_frames"] == len([f for f in machine_findings if "quarantined" in f]) > 0  # xl info's count
    writer.close()
    path = tmp_path / "run.trace"
    path.write_bytes(out.getvalue())

    report = {"kernel_bugs": [], "unexpected_errors": 0, "findings": {str(guest.domid): domain_findings, "machine": machine_findings}, "corruptions": []}
    explained = explain_run(str(path), report)
    assert len(explained) == len(domain_findings) + len(machine_findings)
    first = explained[0]["data"]
    (frame,) = first["frames"]
    assert first["after"] == unpin + 1  # the audit before the destroy: the calls up to it
    assert first["seq"] == unpin and frame["last_changed"]["call"].startswith(f"#{unpin} dom{guest.domid} vCPU1 mmuext_op")
    assert frame["frame"]["mfn"] == hex(l1) and not frame["frame"]["pinned"] and frame["frame"]["type_count"] == 1 and frame["frame"]["owner"] == guest.domid
    assert first["vcpus"] == [f"dom{guest.domid} vCPU1"]
    assert explained[0]["text"].startswith("audit finding: ") and f"last changed by #{unpin} dom{guest.domid} vCPU1 mmuext_op" in explained[0]["text"]
    quarantined = next(e["data"] for e in explained if "quarantined" in e["data"]["report"])
    assert quarantined["after"] is None and quarantined["frames"][0]["frame"]["owner"] != guest.domid  # Xen's now
    assert "destroy_domain" in quarantined["frames"][0]["last_changed"]["call"]
    assert run_timeline(quarantined["timeline"], tmp_path) == 0  # focused on a toolstack call: its lane, and the domain it destroyed
    assert '"lanes":["Xen (toolstack)","dom1 vCPU0","dom1 vCPU1"]' in (tmp_path / "focus.html").read_text()
    assert run_timeline(first["timeline"], tmp_path) == 0
    assert named_problems(report, limit=1) == [f"audit finding: {domain_findings[0]}", f"... and {len(explained) - 1} more audit findings (--json has them all)"]
    capsys.readouterr()
    assert main(["trace", "explain", str(path), "--finding", domain_findings[0], "--after", str(unpin + 1)]) == 0
    assert capsys.readouterr().out.strip() == explained[0]["text"]


def test_a_32_bit_domains_failure_names_its_pae_l3_and_pae_xen_l2(tmp_path):
    """The frames of a 32-bit domain's failed call as they were: the pae_xen_l2 the EPERM
    names, held by entry 3 of the PAE L3 that is vCPU 0's cr3."""
    path = tmp_path / "pae.trace"
    run = pae_server_trace(path)
    (failure,) = explain(str(path))
    (l2,) = failure["data"]["frames"]
    assert l2["frame"]["mfn"] == hex(run["l2"]) and l2["frame"]["pae_xen_l2"]
    assert [(e["table"], e["level"], e["slot"], e["address_size"]) for e in l2["entries"] if e["holds_reference"] and e["level"] > 1] == [(hex(run["l3"]), 3, 3, 32)]
    assert "type L2|PAE_XEN_L2, type count 1" in failure["text"] and f"PAE L3 entry 3 of mfn {run['l3']:#x}" in failure["text"], failure["text"]
