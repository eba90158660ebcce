"""Guest benchmarks: IPI round trips and process lifecycles, with real vCPU processes.

`ipi.*`: vCPU 0 times smp_call_function to vCPU 1 (send, the handler on vCPU 1, the
acknowledgement in guest memory seen by vCPU 0) against a plain hypercall, alternating one by
one in the same process (guestlib.kernel.scenarios, "ipi-rtt"). `guest.*`: four vCPU processes
run the fork / touch / verify / munmap / exit workload for a fixed time, in a 64-bit guest
and (`guest.fork_exit_per_s_pv32`) in a 32-bit PAE one beside it in the same run; for
`guest.balloon_pages_per_s` each also gives BALLOON_PAGES back to Xen and takes them again
between lifecycles (guestlib/kernel/balloon.py), and the key counts pages taken again.
"""

from guestlib.paging import lowmem_pages
from xensim.launch import create_domain, hypervisor_server, run_vcpus

LIFECYCLE_SECONDS = 8.0
BALLOON_SECONDS = 5.0
BALLOON_PAGES = 64


def run() -> dict:
    with hypervisor_server() as server:
        domain = create_domain(server, nr_pages=4096, nr_vcpus=2)
        ipi = run_vcpus(server.address, domain.token, 2, "--scenario", "ipi-rtt").reports[0]
        domain = create_domain(server, nr_pages=16384, nr_vcpus=4)
        work = run_vcpus(server.address, domain.token, 4, "--seconds", str(LIFECYCLE_SECONDS), "--seed", "7")
        domain = create_domain(server, nr_pages=16384, nr_vcpus=4, highmem_pages=16384 - lowmem_pages(32, 16384), address_size=32)
        pae = run_vcpus(server.address, domain.token, 4, "--seconds", str(LIFECYCLE_SECONDS), "--seed", "7")
        domain = create_domain(server, nr_pages=16384, nr_vcpus=4)
        balloon = run_vcpus(server.address, domain.token, 4, "--seconds", str(BALLOON_SECONDS), "--seed", "7", "--balloon", str(BALLOON_PAGES))
    if ipi.get("bug"):
        raise RuntimeError(f"the guest hit a kernel BUG during the IPI benchmark: {ipi['bug']}")
    work.require_work("guest.fork_exit_per_s")
    pae.require_work("guest.fork_exit_per_s_pv32")
    balloon.require_work("guest.balloon_pages_per_s")
    if any(r["data_corruptions"] for r in balloon.reports):
        raise RuntimeError(f"the balloon benchmark found corrupted data: {[r['data_corruptions'] for r in balloon.reports]}")
    taken_again = sum(r["stats"]["ballooned_in"] for r in balloon.reports)
    return {
        "ipi.rtt_us": {"value": ipi["ipi_rtt_us"], "unit": "us", "rounds": ipi["rounds"]},
        "ipi.rtt_over_hypercall": {"value": ipi["ipi_rtt_us"] / ipi["hypercall_rtt_us"], "unit": "ratio", "hypercall_rtt_us": ipi["hypercall_rtt_us"], "target": "<= 3"},
        "guest.fork_exit_per_s": _fork_exit(work, 64),
        "guest.fork_exit_per_s_pv32": _fork_exit(pae, 32),
        "guest.balloon_pages_per_s": {
            "value": taken_again / BALLOON_SECONDS,
            "unit": "pages/s",
            "vcpus": 4,
            "pages_per_vcpu": BALLOON_PAGES,
            "seconds": BALLOON_SECONDS,
            "lifecycles": balloon.lifecycles,
        },
    }


def _fork_exit(work, address_size: int) -> dict:
    return {
        "value": work.lifecycles / LIFECYCLE_SECONDS,
        "unit": "lifecycles/s",
        "address_size": address_size,
        "vcpus": 4,
        "seconds": LIFECYCLE_SECONDS,
        "messages_per_lifecycle": sum(r["messages"] for r in work.reports) / max(work.lifecycles, 1),
    }
