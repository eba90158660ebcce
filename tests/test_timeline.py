"""`xensim timeline`: a trace of a real core run drawn per vCPU, checked as data, as a page,
and as headless Chromium renders it (a screenshot and the DOM after the page's script ran)."""

import io
import re
import shutil
import struct
import subprocess

import grpc
import pytest

from hypervisor.core import Hypervisor, XenError
from hypervisor.core.abi import ENTRIES_PER_TABLE, L2_SLOT_COMPAT_XEN_FIRST, PAGE_SHIFT, MmuextCmd
from hypervisor.core.trace import Records, TraceWriter, frame
from hypervisor.server.tracing import read_trace
from xensim.cli import main
from xensim.timeline import focus, scan
from xensim.v1 import toolstack_pb2

from .core.guest import Guest
from .server.helpers import WireGuest, error_info, status_of
from .support.server import start_server

CHROMIUM = shutil.which("chromium")
CHROMIUM_TIMEOUT = 90


def records(trace: bytes) -> Records:
    """A trace's (number, record) pairs, as `xensim timeline` reads a file."""
    return Records(io.BytesIO(trace))


def race_trace() -> tuple[bytes, dict]:
    """The lazy-TLB unpin race at the core, traced: vCPU 1 still runs on a table that vCPU 0
    unpins, so vCPU 0's attempt to make its pages writable fails with -EBUSY; vCPU 0 IPIs
    vCPU 1 (which switches away) and a multicall carries an entry that fails. Returns the
    trace and the mfns and ports a test needs."""
    hv = Hypervisor(nr_frames=1 << 13)
    out = io.BytesIO()
    hv.tracer = TraceWriter(hv, out)
    guest, other = Guest(hv), Guest(hv)
    tree = guest.new_pgd({0x400000: guest.alloc()[1]})
    guest.pin(4, tree["l4"])
    guest.new_baseptr(tree["l4"], vcpu=1)
    guest.unpin(tree["l4"])
    with pytest.raises(XenError):
        guest.make_writable(tree["pfns"][0])
    port = guest.evtchn("bind_ipi", vcpu=1)
    guest.evtchn("send", port=port)
    guest.new_baseptr(guest.l4, vcpu=1)
    guest.call("multicall", calls=[{"op": "mmuext_op", "args": {"ops": [[3, other.l4, 0]]}}])
    hv.tracer.close()
    return out.getvalue(), {"l4": tree["l4"], "boot_l4": guest.l4, "domid": guest.domid}


def pae_server_trace(path) -> dict:
    """A real server's trace of a 32-bit domain (docs/pv32.md section 4): its boot PAE L3 is
    vCPU 0's cr3, and a write into a Xen slot of the L2 under the L3's slot 3 (its
    pae_xen_l2) fails with -EPERM naming that L2. Returns the domid and both mfns."""
    with start_server("--trace", str(path)) as server:
        guest = WireGuest(server, nr_pages=2048, nr_vcpus=1, address_size=32)
        l3 = guest.start_info.pt_base_mfn
        l2 = guest.toolstack("DumpPagetable", toolstack_pb2.DumpPagetableRequest(mfn=l3)).tables[0].entries[0].mfn
        with pytest.raises(grpc.RpcError) as refused:
            guest.mmu_update(((l2 << PAGE_SHIFT) + 8 * L2_SLOT_COMPAT_XEN_FIRST, 0))
        assert error_info(status_of(refused.value)).reason == "EPERM"
        guest.toolstack("StopTrace", toolstack_pb2.StopTraceRequest())
    return {"domid": guest.domid, "l3": l3, "l2": l2}


def test_scan_follows_each_vcpus_cr3_and_finds_the_ipi_and_every_failed_call():
    trace, run = race_trace()
    timeline = scan(records(trace))
    d = run["domid"]
    assert {(d, 0), (d, 1)} <= timeline.lanes and timeline.total == len(timeline.calls) == len(list(records(trace))) - 2
    errors = [(c.lane, e.split(": ")[0:2]) for c in timeline.failures for e in c.errors]
    assert errors == [((d, 0), ["mmu_update", "EBUSY"]), ((d, 0), ["mmuext_op", "EINVAL"])]
    assert next(c for c in timeline.failures if "EINVAL" in c.errors[0]).multicall
    (ipi,) = [c for c in timeline.calls if c.kind == "ipi"]
    assert (ipi.lane, ipi.target) == ((d, 0), (d, 1))
    on_tree = [(lane, mfn) for lane, _, _, mfn in timeline.bands if mfn == run["l4"]]
    assert on_tree == [((d, 1), run["l4"])]  # vCPU 1 sat on the unpinned table until it left
    unpin = next(c for c in timeline.calls if c.kind == "unpin")
    ((_, start, end, _),) = [b for b in timeline.bands if b[3] == run["l4"]]
    assert start < unpin.seq < end


def test_a_window_keeps_the_state_from_before_it():
    trace, run = race_trace()
    full = scan(records(trace))
    unpin = next(c for c in full.calls if c.kind == "unpin")
    window = scan(records(trace), first=unpin.seq, count=3)
    assert [c.seq for c in window.calls] == [unpin.seq, unpin.seq + 1, unpin.seq + 2]
    assert (window.first, window.last, window.total) == (unpin.seq, unpin.seq + 2, full.total)
    assert ((run["domid"], 1), unpin.seq, unpin.seq + 3, run["l4"]) in window.bands  # begun before, clipped to it


def write_page(tmp_path) -> tuple:
    trace, run = race_trace()
    (tmp_path / "run.trace").write_bytes(trace)
    page = tmp_path / "timeline.html"
    assert main(["timeline", str(tmp_path / "run.trace"), "--html", str(page)]) == 0
    return page, run


def test_the_page_is_self_contained(tmp_path):
    page, _ = write_page(tmp_path)
    text = page.read_text()
    assert re.findall(r"https?://[^\"'\s]+", text) == ["http://www.w3.org/2000/svg"] * 2  # the SVG namespace, nothing fetched
    assert "<link" not in text and " src=" not in text and "EBUSY" in text


def chromium(*flags: str, url: str, profile) -> subprocess.CompletedProcess:
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,900", *flags, url,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
@pytest.mark.timeout(2 * CHROMIUM_TIMEOUT + 30)
def test_chromium_draws_the_lanes_and_the_failed_calls(tmp_path):
    page, run = write_page(tmp_path)
    shot = tmp_path / "timeline.png"
    chromium(f"--screenshot={shot}", url=page.as_uri(), profile=tmp_path / "profile")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1400, 900)
    assert len(png) > 20_000  # a blank page of this size is about 6 KB

    dom = chromium("--dump-dom", url=page.as_uri(), profile=tmp_path / "profile").stdout
    svg = dom[dom.index("<svg") : dom.index("</svg>")]  # drawn by the page's script
    d = run["domid"]
    assert f"dom{d} vCPU0" in dom and f"dom{d} vCPU1" in dom
    assert len(re.findall(r'<line [^>]*class="ev k-error"', svg)) >= 2
    assert "mmu_update: EBUSY: " in svg and "mmuext_op: EINVAL: " in svg  # in the failed calls' tooltips
    assert f"cr3 = mfn 0x{run['l4']:x}" in svg and 'class="ev k-ipi"' in svg


def test_focus_keeps_the_failing_domain_and_marks_the_frames_its_error_names(tmp_path):
    trace, run = race_trace()
    timeline = scan(records(trace))
    busy = next(c for c in timeline.failures if "EBUSY" in c.errors[0])
    focused = focus(timeline, busy.seq)
    d = run["domid"]
    assert {lane[0] for lane in focused.lanes} == {d} and {lane[0] for lane in timeline.lanes} > {d}  # the other domain is gone
    assert run["l4"] in focused.hot_mfns
    assert [b for b in focused.bands if b[3] == run["l4"]] == [b for b in timeline.bands if b[3] == run["l4"]]
    kinds = {c.kind for c in focused.calls if run["l4"] in c.mfns}
    assert {"pin", "unpin", "cr3", "error"} <= kinds  # every call that named the tree's L4
    with pytest.raises(ValueError, match="is not a failed call"):
        focus(timeline, 1)

    (tmp_path / "run.trace").write_bytes(trace)
    page = tmp_path / "focus.html"
    assert main(["timeline", str(tmp_path / "run.trace"), "--html", str(page), "--focus", str(busy.seq)]) == 0
    text = page.read_text()
    assert f"focused on #{busy.seq}: its domain only, " in text and f'"focus":{busy.seq}' in text
    assert main(["timeline", str(tmp_path / "run.trace"), "--html", str(page), "--focus", "1"]) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
@pytest.mark.timeout(CHROMIUM_TIMEOUT + 30)
def test_chromium_scrolls_to_the_focused_failure_and_marks_the_frame(tmp_path):
    trace, run = race_trace()
    (tmp_path / "run.trace").write_bytes(trace)
    busy = next(c for c in scan(records(trace)).failures if "EBUSY" in c.errors[0])
    page = tmp_path / "focus.html"
    assert main(["timeline", str(tmp_path / "run.trace"), "--html", str(page), "--focus", str(busy.seq)]) == 0
    dom = chromium("--dump-dom", url=page.as_uri(), profile=tmp_path / "profile").stdout
    svg = dom[dom.index("<svg") : dom.index("</svg>")]
    assert f'class="ev k-error focus" id="c{busy.seq}"' in svg  # show() ran: scrolled to it and marked
    assert f"cr3 = mfn 0x{run['l4']:x}" in svg and 'class="hot"' in svg
    assert "Xen (toolstack)" not in dom.split("<svg")[0].split('id="lanes"')[1]


def test_scan_draws_a_preempted_call_where_it_ends_and_its_stops_as_such():
    """A long call stops part-way and goes on in records of its own (docs/preemption.md):
    each stop is drawn as a stop, and the call's entries (here a NEW_BASEPTR, which moves the
    cr3 band) with the record it ends in."""
    hv = Hypervisor(nr_frames=1 << 14, preempt_work=2 * ENTRIES_PER_TABLE)
    guest = Guest(hv, nr_pages=4096)
    guest.leave_boot_tree()
    out = io.BytesIO()
    hv.tracer = TraceWriter(hv, out)
    stops = guest.go_on(guest.mmuext((MmuextCmd.PIN_L4_TABLE, guest.l4), (MmuextCmd.NEW_BASEPTR, guest.l4)))[1]
    hv.tracer.close()
    timeline = scan(records(out.getvalue()))
    lines = [c.lines for c in timeline.calls if c.lane == (guest.domid, 0)]
    assert sum("stops part-way" in line[0] for line in lines) == len(stops) >= 2
    assert lines[-1] == [f"mmuext_op PIN_L4_TABLE 0x{guest.l4:x}", f"mmuext_op NEW_BASEPTR 0x{guest.l4:x}"]
    assert [b for b in timeline.bands if b[3] == guest.l4][0][0] == (guest.domid, 0)


def test_a_vm_assist_line_names_its_command_and_assist():
    """The kernel's first call at boot reads as what it does, not as its numbers."""
    hv = Hypervisor(nr_frames=1 << 14)
    out = io.BytesIO()
    hv.tracer = TraceWriter(hv, out)
    guest = Guest(hv, nr_pages=1024)  # turns writable_pagetables on, as Linux does at boot
    hv.tracer.close()
    lines = [line for c in scan(records(out.getvalue())).calls if c.lane == (guest.domid, 0) for line in c.lines]
    assert "vm_assist enable writable_pagetables" in lines


def test_a_controlled_runs_step_records_are_not_calls():
    """A controlled run's trace holds {"sched": ...} records beside the calls (docs/schedule.md
    section 5): the timeline (and `trace export`, which scans with it) skips them, counting
    and drawing the same calls as without them."""
    trace, _ = race_trace()
    plain = scan(records(trace))
    header, rest = trace.split(b"\n", 1)
    stepped = header + b"\n" + frame({"sched": [1, 1, 0]}) + frame({"sched": {"lost_determinism": {"step": 1, "vcpus": [[1, 0]], "why": "x"}}}) + rest
    timeline = scan(records(stepped))
    assert timeline.total == plain.total and [c.seq for c in timeline.calls] == [c.seq for c in plain.calls]


def test_a_32_bit_domains_lanes_run_on_its_pae_l3(tmp_path):
    """A 32-bit domain's cr3 is its PAE L3, not an L4: the band says so, and the lane is
    marked 32-bit; its failed call names the pae_xen_l2."""
    path = tmp_path / "pae.trace"
    run = pae_server_trace(path)
    d = run["domid"]
    timeline = scan(read_trace(str(path)))
    assert timeline.address_sizes == {d: 32}
    assert [(lane, mfn) for lane, _, _, mfn in timeline.bands] == [((d, 0), run["l3"])]
    (failed,) = timeline.failures
    assert f"EPERM: mmu_update entry 0: L2 entry {L2_SLOT_COMPAT_XEN_FIRST} of mfn {run['l2']:#x}" in failed.errors[0] and run["l2"] in failed.mfns
    page = tmp_path / "pae.html"
    assert main(["timeline", str(path), "--html", str(page)]) == 0
    text = page.read_text()
    assert f"<div>dom{d} vCPU0 (32-bit)</div>" in text and '"tops":["","PAE L3"]' in text
