"""The guest kernel end to end: real vCPU processes against a real hypervisor server.

Each test creates a domain, runs one `guestlib.vcpu` process per vCPU, checks their reports,
then destroys the domain and audits the whole machine (no finding, no leak).
"""

import pytest

from .kernel import audit_after_destroy, run_guest

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("highpte", [False, True], ids=["lowmem-pte", "highpte"])
def test_four_vcpus_fork_touch_migrate_exit_then_audit_clean(server, highpte):
    args = ["--lifecycles", "12", "--seconds", "60", "--seed", "3", "--migrate", "0.5"] + (["--highpte"] if highpte else [])
    domid, run = run_guest(server, 4, *args, highmem_pages=2048 if highpte else 0)
    assert run.bugs == [] and run.returncodes == [0, 0, 0, 0], run.stderr
    assert all(r["data_corruptions"] == [] for r in run.reports)
    stats = [r["stats"] for r in run.reports]
    assert run.lifecycles >= 4 * 12  # each vCPU's own, plus tasks handed over to it
    assert sum(s["migrations"] for s in stats) > 0 and sum(s["cow"] for s in stats) > 0
    assert sum(s["lazy"] for s in stats) > 0 and sum(s["munmaps"] for s in stats) > 0
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
def test_unpin_race_by_drop_mm_ref_variant(server, scenario, variant, fails):
    """vCPU 1 ran task T and is lazy on its mm (lazy-exit), or has its switch away from it
    still queued (stale-cr3), while vCPU 0 exits T. Without the right shootdown, exit_mmap's
    writable remap after UNPIN fails with -EBUSY: a kernel BUG naming it."""
    domid, run = run_guest(server, 2, "--variant", variant, "--scenario", scenario, nr_pages=4096)
    exiter, victim = run.reports
    assert victim["bug"] is None
    if fails:
        assert "in exit_mmap: after UNPIN_TABLE" in exiter["bug"] and "-EBUSY from mmu_update" in exiter["bug"]
        assert run.returncodes[0] == 3
    else:
        assert exiter["bug"] is None and exiter["lifecycles"] == 1 and run.returncodes == [0, 0]
    assert audit_after_destroy(server, domid) == []


def test_highpte_kmap_slot_is_readonly_while_pinned(server):
    domid, run = run_guest(server, 1, "--highpte", "--scenario", "kmap-readonly", nr_pages=4096, highmem_pages=1024)
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
