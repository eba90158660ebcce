"""The guest kernel as a 32-bit PAE guest on the compat ABI (docs/linux.md section 13), beside
64-bit ones: real vCPU processes against a real hypervisor server, each run audited."""

import json
import re

import pytest

from tests.test_programs import REPORT_KEYS, xensim
from xensim.hunt import Hunt
from xensim.v1 import common_pb2, toolstack_pb2

from .kernel import audit_after_destroy, run_guest

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(("highpte", "evtchn"), [(False, "fifo"), (True, "fifo"), (False, "2l")], ids=["lowmem-pte", "highpte", "2-level"])
def test_a_32_bit_guest_boots_pae_and_runs_lifecycles(server, highpte, evtchn):
    """Four vCPUs fork, fault, migrate and exit on PAE pgds (PIN_L3, an unshared kernel pmd
    per pgd); every child's heap pte page joins its pinned mm and leaves it again. Their IPIs
    go over FIFO event channels, or 2-level ones in the compat layout (u32 words)."""
    args = ["--lifecycles", "6", "--seconds", "60", "--seed", "3", "--migrate", "0.5", "--evtchn", evtchn] + (["--highpte"] if highpte else [])
    domid, run = run_guest(server, 4, *args, nr_pages=4096, address_size=32)
    assert run.bugs == [] and run.returncodes == [0, 0, 0, 0], run.stderr
    assert all(r["data_corruptions"] == [] for r in run.reports) and {r["evtchn"] for r in run.reports} == {evtchn}
    stats = [r["stats"] for r in run.reports]
    assert run.lifecycles >= 4 * 6 and sum(s["migrations"] for s in stats) > 0 and sum(s["cow"] for s in stats) > 0
    assert sum(s["pte_allocs"] for s in stats) == sum(s["forks"] for s in stats)
    info = server.toolstack().DomainInfo(toolstack_pb2.DomainInfoRequest(domid=domid), metadata=server.toolstack_metadata()).domain
    assert info.address_size == 32 and 0 < info.nr_lowmem_pages < info.nr_pages
    counts = server.toolstack().DomainStats(toolstack_pb2.DomainStatsRequest(domid=domid), metadata=server.toolstack_metadata()).counts
    assert [(c.errno, c.count) for c in counts if c.op == "vm_assist"] == [(0, 2)]  # writable_pagetables, pae_extended_cr3: once, at boot
    assert audit_after_destroy(server, domid) == []


@pytest.mark.parametrize("variant", ["current-cr3", "modern"])
def test_a_32_bit_guest_runs_lifecycles_in_each_correct_variant(server, variant):
    """Half the children exit on the other vCPU. (`none` and `mask` hit the race here too, as
    the scenarios above show on purpose.)"""
    domid, run = run_guest(server, 2, "--variant", variant, "--lifecycles", "8", "--seconds", "60", "--seed", "4", "--migrate", "0.5", nr_pages=4096, address_size=32)
    assert run.bugs == [] and run.lifecycles >= 2 * 8 and all(r["data_corruptions"] == [] for r in run.reports), run.stderr
    assert audit_after_destroy(server, domid) == []


@pytest.mark.timeout(240)
def test_a_mixed_machine_under_stress_with_killed_vcpus_finishes_clean(tmp_path):
    """Two 32-bit and two 64-bit domains on one hypervisor, vCPU processes SIGKILLed and
    restarted (reading the P2M list back from guest memory, the balloon's u32 or u64 entries
    in it): no audit finding, no corruption, every frame freed and accounted for."""
    report_file = tmp_path / "stress.json"
    args = ("--domains", "4", "--address-sizes", "32,64", "--vcpus", "2", "--pages", "2048", "--seconds", "8", "--kill-vcpus", "0.2", "--balloon", "4")
    done = xensim("stress", *args, "--json", str(report_file), timeout=220)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert sorted(report["address_sizes"].values()) == [32, 32, 64, 64] and "32-bit/64-bit domains" in done.stdout
    assert [report[k] for k in REPORT_KEYS[1:]] == [0, 0, 0, 0] and report["kernel_bugs"] == [] and report["unaccounted_frames"] == 0
    assert report["killed_vcpus"] > 0 and report["unfinished_vcpus"] == 0 and report["totals"]["ballooned_in"] > 0
    by_size = {size: sum(r.get("lifecycles", 0) for r in report["vcpu_reports"] if report["address_sizes"][str(r["domid"])] == size) for size in (32, 64)}
    assert by_size[32] > 0 and by_size[64] > 0, by_size


def test_the_32_bit_kernel_pins_its_boot_l3_and_leaves_the_builders_kernel_pmd_alone(server):
    """After a run the builder's pinned PAE L3 is still swapper's pgd, its slot-3 pmd Xen's
    PAE_XEN_L2, and the kernel pmd of every pgd the kernel made has been freed with it."""
    domid, run = run_guest(server, 1, "--lifecycles", "2", "--seconds", "60", nr_pages=4096, address_size=32)
    assert run.bugs == [], run.stderr
    created_l3 = run.reports[0]["final"]["xen_cr3"]
    assert created_l3 == run.reports[0]["final"]["xen_current_cr3"]
    summary = server.toolstack().DomainSummary(toolstack_pb2.DomainSummaryRequest(domid=domid), metadata=server.toolstack_metadata())
    by_type = {t.type: t.count for t in summary.by_type}
    assert by_type.get(common_pb2.PAGE_TYPE_L3) == 1 and by_type.get(common_pb2.PAGE_TYPE_L4, 0) == 0
    assert audit_after_destroy(server, domid) == []


def test_demo_runs_a_32_bit_guest_and_says_so(tmp_path):
    report_file = tmp_path / "demo.json"
    done = xensim("demo", "--address-size", "32", "--seconds", "3", "--vcpus", "2", "--no-trace", "--json", str(report_file), timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert list(report["address_sizes"].values()) == [32] and report["process_lifecycles"] > 0
    assert [report[k] for k in REPORT_KEYS[1:]] == [0, 0, 0, 0] and report["kernel_bugs"] == []
    assert "--address-size 32" in report["reproduce"] and "32-bit PAE (compat ABI)" in done.stdout


def test_a_hunt_of_a_32_bit_guest_reproduces_as_one():
    """The race table's rows per address size: each row's reproducing command runs its size."""
    assert Hunt("mask", address_size=32).reproduce(7).endswith("--variant mask --migrate 1 --address-size 32 --schedule pct:7:3 --steps 3000")
    assert "--address-size" not in Hunt("mask").reproduce(7)


def test_one_guest_replica_runs_the_vcpus_of_a_32_bit_and_a_64_bit_domain(server, tmp_path):
    """`xensim toolstack create --address-sizes 32,64` and one `xensim guest` replica claiming
    every vCPU of both: each vCPU process finds its kernel's mode from the hypervisor alone."""
    tokens = tmp_path / "tokens"
    made = xensim("toolstack", "create", "--server", server.address, "--domains", "2", "--address-sizes", "32,64", "--vcpus", "2", "--pages", "2048", "--out", str(tokens), timeout=60)
    assert made.returncode == 0 and "32-bit" in made.stdout and "64-bit" in made.stdout, made.stdout + made.stderr
    done = xensim("guest", "--tokens", str(tokens), "--vcpus-per-replica", "4", "--seconds", "3", timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["unclaimed"] == 0 and summary["failures"] == [] and summary["lifecycles"] > 0
    created = {int(domid): int(size) for domid, size in re.findall(r"^dom(\d+): (\d+)-bit", made.stdout, re.M)}
    assert sorted(created.values()) == [32, 64]
    assert sorted((r["domid"], r["vcpu"]) for r in summary["ran"]) == sorted((domid, vcpu) for domid in created for vcpu in (0, 1))
    infos = server.toolstack().ListDomains(toolstack_pb2.ListDomainsRequest(), metadata=server.toolstack_metadata()).domains
    assert {d.domid: d.address_size for d in infos if d.domid in created} == created
    for domid in created:
        assert audit_after_destroy(server, domid) == []
