"""The guest kernel end to end: real vCPU processes against a real hypervisor server.

Each test creates a domain, runs one `guestlib.vcpu` process per vCPU, checks their reports,
then destroys the domain and audits the whole machine (no finding, no leak).
"""

import json
import signal

import pytest

from guestlib.paging import lowmem_pages
from hypervisor.core.hypervisor import RESERVED_FRAMES
from tests.support.server import start_server
from xensim.launch import run, run_vcpus, started, vcpu_command
from xensim.v1 import common_pb2, toolstack_pb2

from .kernel import VCPU_TIMEOUT, audit_after_destroy, run_guest

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(("highpte", "evtchn"), [(False, "fifo"), (True, "fifo"), (False, "2l")], ids=["lowmem-pte", "highpte", "2-level"])
def test_four_vcpus_fork_touch_migrate_exit_then_audit_clean(server, highpte, evtchn):
    """With FIFO event channels (the default, docs/linux.md section 12) and with 2-level."""
    args = ["--lifecycles", "12", "--seconds", "60", "--seed", "3", "--migrate", "0.5", "--evtchn", evtchn] + (["--highpte"] if highpte else [])
    domid, run = run_guest(server, 4, *args, highmem_pages=2048 if highpte else 0)
    assert run.bugs == [] and run.returncodes == [0, 0, 0, 0], run.stderr
    assert {r["evtchn"] for r in run.reports} == {evtchn}
    assert all(r["data_corruptions"] == [] for r in run.reports)
    stats = [r["stats"] for r in run.reports]
    assert run.lifecycles >= 4 * 12  # each vCPU's own, plus tasks handed over to it
    assert sum(s["migrations"] for s in stats) > 0 and sum(s["cow"] for s in stats) > 0
    assert sum(s["lazy"] for s in stats) > 0 and sum(s["munmaps"] for s in stats) > 0
    # Every child's heap pte page joined its pinned mm (xen_alloc_pt) and left it by munmap.
    assert sum(s["pte_allocs"] for s in stats) == sum(s["forks"] for s in stats)
    assert audit_after_destroy(server, domid) == []


@pytest.mark.parametrize(
    "scenario,variant,fails",
    [
        ("lazy-exit", "none", True),
        ("lazy-exit", "mask", False),
        ("lazy-exit", "current-cr3", False),
        ("lazy-exit", "modern", False),
        ("stale-cr3", "mask", True),
        ("stale-cr3", "current-cr3", False),
        ("stale-cr3", "modern", False),
    ],
)
@pytest.mark.parametrize("address_size", [64, 32])
def test_unpin_race_by_drop_mm_ref_variant(server, scenario, variant, fails, address_size):
    """vCPU 1 ran task T and is lazy on its mm (lazy-exit), or has its switch away from it
    still queued (stale-cr3), while vCPU 0 exits T. Without the right shootdown, exit_mmap's
    writable remap after UNPIN fails with -EBUSY: a kernel BUG naming it. A 32-bit PAE guest
    races the same way, its pinned L3 in place of the L4."""
    domid, run = run_guest(server, 2, "--variant", variant, "--scenario", scenario, nr_pages=4096, address_size=address_size)
    exiter, victim = run.reports
    assert victim["bug"] is None
    if fails:
        assert "in exit_mmap: after UNPIN_TABLE" in exiter["bug"] and "-EBUSY from mmu_update" in exiter["bug"]
        assert run.returncodes[0] == 3
    else:
        assert exiter["bug"] is None and exiter["lifecycles"] == 1 and run.returncodes == [0, 0]
    assert audit_after_destroy(server, domid) == []


@pytest.mark.parametrize(("variant", "address_size"), [("mask", 64), ("modern", 64), ("mask", 32)])
def test_a_vcpu_killed_between_switch_mm_messages_finishes_the_switch_on_restart(server, variant, address_size):
    """vCPU 1's process dies (SIGKILL) after switch_mm's memory writes but before its cr3
    switch reaches Xen, while vCPU 0 is about to exit T, whose pgd Xen still has as vCPU 1's
    cr3. The new vCPU 1 process must finish the switch as it attaches: otherwise `mask`
    (vCPU 1 has left T's cpumask) gets -EBUSY after UNPIN, and `modern` (vCPU 1 is found
    through xen_current_cr3) BUGs in the IPI handler, which has nothing to switch away from.
    A 32-bit PAE guest's restarted vCPU 1 learns its mode from the entry point vCPU 0 gave it."""
    domain = server.create_domain(nr_pages=4096, nr_vcpus=2, highmem_pages=4096 - lowmem_pages(address_size, 4096), address_size=address_size)
    command = [vcpu_command(server.address, domain.token, v, "--variant", variant, "--scenario", "killed-mid-switch") for v in (0, 1)]
    with started(command[0]) as exiter:
        killed = run(command[1], timeout=VCPU_TIMEOUT)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        second = run(command[1], timeout=VCPU_TIMEOUT)
        out = exiter.finish(VCPU_TIMEOUT)
    err = exiter.log()
    victim, report = (json.loads(text.strip().splitlines()[-1]) for text in (second.stdout, out))
    assert victim["restarted"] and victim["bug"] is None and second.returncode == 0, second.stderr
    assert report["bug"] is None and report["lifecycles"] == 1 and exiter.process.returncode == 0, err
    assert audit_after_destroy(server, domain.domid) == []


@pytest.mark.parametrize("variant", ["mask", "current-cr3", "modern"])
def test_a_cpu_going_offline_runs_its_pending_calls_first_and_none_after(server, variant):
    """offline-call (docs/linux.md section 16): vCPU 1 goes offline with vCPU 0's drop_mm_ref
    for T addressed to it. It must run the call before it writes OFFLINE: vCPU 0 stops waiting
    for an offline CPU and frees T. A second drop_mm_ref for the freed T, which finds vCPU 1
    offline, must never run (its IPI arrives once vCPU 1's interrupts are on again), and a new
    process for the offline vCPU 1 must not run it either: either would BUG in read_mm."""
    domain = server.create_domain(nr_pages=4096, nr_vcpus=2)
    args = ("--variant", variant, "--scenario", "offline-call")
    first = run_vcpus(server.address, domain.token, 2, *args)
    assert first.bugs == [] and first.returncodes == [0, 0], first.stderr
    assert first.reports[0]["lifecycles"] == 1 and first.reports[1]["calls_run"] == 1
    again = run(vcpu_command(server.address, domain.token, 1, *args), timeout=VCPU_TIMEOUT)
    report = json.loads(again.stdout.strip().splitlines()[-1]) if again.stdout.strip() else {}
    assert again.returncode == 0 and report.get("restarted") and report.get("bug") is None, again.stderr
    assert audit_after_destroy(server, domain.domid) == []


def test_the_kernel_stops_every_periodic_timer_and_moves_each_vcpu_info_into_its_percpu_page(server):
    """As Linux does at boot (docs/linux.md section 11): one-shot timers only, and vcpu_info in
    per-CPU memory, where the kernel's event dispatch then reads it (events flow: the run ends)."""
    domid, run = run_guest(server, 2, "--lifecycles", "2", "--seconds", "30", "--seed", "5")
    assert run.bugs == [] and run.returncodes == [0, 0], run.stderr
    vcpus = server.toolstack().VcpuInfo(toolstack_pb2.VcpuInfoRequest(domid=domid), metadata=server.toolstack_metadata(), timeout=10).vcpus
    assert [v.periodic_period_ns for v in vcpus] == [0, 0]
    places = [(v.vcpu_info_mfn, v.vcpu_info_offset) for v in vcpus]
    assert all(mfn for mfn, _ in places) and len({mfn for mfn, _ in places}) == 2 and len({offset for _, offset in places}) == 1
    frames = server.toolstack().FrameInfo(toolstack_pb2.FrameInfoRequest(mfn=places[0][0]), metadata=server.toolstack_metadata(), timeout=10).frames
    assert frames[0].type == common_pb2.PAGE_TYPE_WRITABLE and frames[0].owner == domid
    assert audit_after_destroy(server, domid) == []


@pytest.mark.parametrize("address_size", [64, 32])
def test_highpte_kmap_slot_is_readonly_while_pinned(server, address_size):
    """xen_kmap_atomic_pte: the pinned mm's highmem pte page is reached through a read-only
    kmap slot; Xen refuses a writable one (-EBUSY), which it would allow were the pgd not
    really pinned (at L4, or at L3 on PAE)."""
    domid, run = run_guest(server, 1, "--highpte", "--scenario", "kmap-readonly", nr_pages=4096, highmem_pages=1024, address_size=address_size)
    (report,) = run.reports
    assert report["highmem_l1"] and report["writable_kmap_while_pinned"] == "EBUSY"
    assert report["valid_entry_store_emulated"] and report["invalid_entry_store_fault"] == 3  # P|W
    assert report["writable_kmap_after_unpin"]
    assert audit_after_destroy(server, domid) == []


def test_none_variant_hits_the_race_in_the_workload(server):
    domid, run = run_guest(server, 2, "--variant", "none", "--seconds", "30", "--seed", "5", "--migrate", "1", nr_pages=4096)
    assert len(run.bugs) == 1 and "in exit_mmap: after UNPIN_TABLE" in run.bugs[0]
    assert any(r.get("stopped") for r in run.reports)  # the other vCPU panicked cleanly
    assert audit_after_destroy(server, domid) == []


@pytest.mark.parametrize("largest", [False, True], ids=["256MiB", "largest-the-machine-takes"])
def test_a_guest_above_128_mib_boots_and_runs_lifecycles(largest):
    """The page allocator's bitmap spans more than one page from 32,769 pages on: its reads
    must not cross a page (a block read that does fails, and every vCPU BUGs at boot). The
    largest guest is every free frame of a 1 GiB machine but the shared-info page."""
    frames = 1 << 18
    nr_pages = frames - RESERVED_FRAMES - 1 if largest else 65536
    with start_server(frames=frames) as server:
        domid, run = run_guest(server, 2, "--lifecycles", "3", "--seconds", "60", "--seed", "7", nr_pages=nr_pages)
        assert run.bugs == [] and run.returncodes == [0, 0], run.stderr
        assert run.lifecycles >= 2 * 3 and all(r["data_corruptions"] == [] for r in run.reports)
        assert audit_after_destroy(server, domid) == []


def test_a_benchmark_refuses_the_figures_of_guests_that_bugged_or_did_nothing(server):
    """server.rss_mb_4x256 once measured four guests that had all died at boot: a benchmark's
    guest run must fail loudly on a kernel BUG or a vCPU process that did no work."""
    _, bugged = run_guest(server, 2, "--variant", "none", "--scenario", "lazy-exit", nr_pages=4096)
    with pytest.raises(RuntimeError, match="in exit_mmap: after UNPIN_TABLE"):
        bugged.require_work("bench")
    _, idle = run_guest(server, 1, "--scenario", "kmap-readonly", "--highpte", nr_pages=4096, highmem_pages=1024)
    with pytest.raises(RuntimeError, match=r"no process lifecycle on vCPU processes \[0\]"):
        idle.require_work("bench")


def _messages_per_lifecycle(server, nr_vcpus: int, *args: str) -> float:
    """Messages per lifecycle, boot and teardown left out: the difference between a run of
    30 lifecycles per vCPU and one of 10, over the lifecycles between them."""
    runs = []
    for lifecycles in (10, 30):
        domid, run = run_guest(server, nr_vcpus, "--controlled", "--lifecycles", str(lifecycles), "--seconds", "120", "--seed", "4", *args)
        assert run.bugs == [] and all(r["data_corruptions"] == [] for r in run.reports), run.stderr
        assert audit_after_destroy(server, domid) == []
        runs.append((sum(r["messages"] for r in run.reports), run.lifecycles))
    (m10, l10), (m30, l30) = runs
    return (m30 - m10) / (l30 - l10)


@pytest.mark.timeout(300)
def test_a_lifecycle_takes_the_messages_its_dependencies_force():
    """guestlib/kernel/__init__.py counts the dependent messages of a lifecycle: 9 when the
    child exits where it was forked, 14 when it migrates (1.5 a lifecycle for page-pool
    refills and claim retries on top). Each message is ~1 ms of machine CPU, so a path that
    sends one message more than its dependencies force shows here. The hypervisor schedules the
    vCPUs (docs/schedule.md section 1), so the counts are the same on a loaded machine as on
    an idle one: free-running, the retries of two racing vCPUs rose with the load.
    """
    with start_server("--schedule", "random:4") as server:
        local = _messages_per_lifecycle(server, 1)
        both = _messages_per_lifecycle(server, 2, "--migrate", "0.5")
    assert local <= 9 + 1.5, local
    assert both <= (9 + 14) / 2 + 1.5, both


def test_the_balloon_gives_pages_back_and_takes_them_again_under_load(server):
    """Each vCPU gives 8 pages back to Xen (decrease_reservation) and takes them again
    (populate_physmap) between lifecycles: every frame Xen returns is scrubbed and keeps the
    pattern written into it, the kernel's mfn_to_pfn reads the read-only M2P, and the machine
    audits clean with every frame accounted for."""
    free_before = server.toolstack().HostInfo(toolstack_pb2.HostInfoRequest(), metadata=server.toolstack_metadata()).free_frames
    domid, run = run_guest(server, 4, "--lifecycles", "10", "--seconds", "60", "--seed", "5", "--balloon", "8")
    assert run.bugs == [] and run.returncodes == [0, 0, 0, 0], run.stderr
    assert all(r["data_corruptions"] == [] for r in run.reports)
    stats = [r["stats"] for r in run.reports]
    assert all(s["ballooned_out"] >= 8 and s["ballooned_in"] == s["ballooned_out"] for s in stats), [(s["forks"], s["ballooned_out"], s["ballooned_in"]) for s in stats]
    assert sum(s["ballooned_out"] for s in stats) >= 4 * 8 * 3
    assert audit_after_destroy(server, domid) == []
    assert server.toolstack().HostInfo(toolstack_pb2.HostInfoRequest(), metadata=server.toolstack_metadata()).free_frames == free_before
