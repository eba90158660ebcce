"""Running the guest kernel for tests: one real process per vCPU against a real server."""

import json
import subprocess
import sys
from dataclasses import dataclass

from xensim.v1 import toolstack_pb2

VCPU_TIMEOUT = 90.0


@dataclass
class GuestRun:
    domid: int
    reports: list[dict]
    returncodes: list[int]
    stderr: list[str]

    @property
    def bugs(self) -> list[str]:
        return [r["bug"] for r in self.reports if r.get("bug")]

    @property
    def lifecycles(self) -> int:
        return sum(r.get("lifecycles", 0) for r in self.reports)


def run_guest(server, nr_vcpus: int, *args: str, nr_pages: int = 8192, highmem_pages: int = 0) -> GuestRun:
    """Create a domain and run `python -m guestlib.vcpu` once per vCPU with `args`; every
    process is waited for (and killed past the timeout); the domain stays for the caller."""
    domain = server.create_domain(nr_pages=nr_pages, nr_vcpus=nr_vcpus, highmem_pages=highmem_pages)
    base = [sys.executable, "-m", "guestlib.vcpu", "--server", server.address, "--token", domain.token]
    procs = [subprocess.Popen([*base, "--vcpu", str(v), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in range(nr_vcpus)]
    reports, codes, errors = [], [], []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=VCPU_TIMEOUT)
            lines = out.strip().splitlines()
            reports.append(json.loads(lines[-1]) if lines else {"bug": f"no report; stderr: {err[-2000:]}"})
            codes.append(proc.returncode)
            errors.append(err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return GuestRun(domain.domid, reports, codes, errors)


def destroy_and_audit(server, domid: int) -> list[str]:
    """Destroy the domain and audit the whole machine: every finding, none expected."""
    stub, metadata = server.toolstack(), server.toolstack_metadata()
    stub.DestroyDomain(toolstack_pb2.DestroyDomainRequest(domid=domid), metadata=metadata, timeout=30)
    return [str(f) for f in stub.Audit(toolstack_pb2.AuditRequest(), metadata=metadata, timeout=30).findings]
