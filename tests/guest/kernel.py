"""Running the guest kernel for tests: one real process per vCPU against a real server."""

from guestlib.paging import lowmem_pages
from xensim.launch import VcpuRun, destroy_and_audit, run_vcpus

VCPU_TIMEOUT = 90.0


def run_guest(server, nr_vcpus: int, *args: str, nr_pages: int = 8192, highmem_pages: int = 0, address_size: int = 64) -> tuple[int, VcpuRun]:
    """Create a domain on the test server and run its vCPU processes with `args`. A 32-bit
    (PAE) domain's highmem is what lies above its scaled direct map."""
    if address_size == 32:
        highmem_pages = nr_pages - lowmem_pages(32, nr_pages)
    domain = server.create_domain(nr_pages=nr_pages, nr_vcpus=nr_vcpus, highmem_pages=highmem_pages, address_size=address_size)
    return domain.domid, run_vcpus(server.address, domain.token, nr_vcpus, *args, timeout=VCPU_TIMEOUT)


def audit_after_destroy(server, domid: int) -> list[str]:
    return destroy_and_audit(server.toolstack(), server.toolstack_metadata(), domid)
