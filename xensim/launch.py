"""Starting the pieces as real processes: a hypervisor server, domains, vCPU processes.

The programs (bench, demo, stress) and the tests run the simulator the way a user does: the
hypervisor is `python -m hypervisor serve` on a free loopback port, domains are made through
the Toolstack service, and each vCPU is `python -m guestlib.vcpu` in its own process.
"""

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from xensim.v1 import toolstack_pb2, toolstack_pb2_grpc

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
VCPU_TIMEOUT = 300.0
TRACE_CACHE_BYTES = 256 << 20  # a 20 s demo writes ~2.5 MB


def default_trace() -> str:
    """Where a demo's trace goes unless --trace says: a new file in the per-user cache
    ($XDG_CACHE_HOME/xensim/traces, else ~/.cache/...), whose oldest traces are removed so
    that those kept stay under TRACE_CACHE_BYTES."""
    directory = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xensim" / "traces"
    directory.mkdir(parents=True, exist_ok=True)
    kept = 0
    for trace in sorted(directory.glob("*.jsonl.gz"), key=lambda p: p.stat().st_mtime, reverse=True):
        kept += trace.stat().st_size
        if kept > TRACE_CACHE_BYTES:
            trace.unlink(missing_ok=True)
    return str(directory / f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl.gz")


@dataclass
class Server:
    """A running `python -m hypervisor serve`: where it listens, its ready line, its stderr."""

    address: str
    admin_token: str | None
    ready: dict
    process: subprocess.Popen
    stderr: "tempfile._TemporaryFileWrapper"
    killed: bool = False  # it did not stop within STOP_TIMEOUT of SIGTERM
    _final_log: str | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What a Toolstack call carries: the admin token, or nothing without one."""
        return (("authorization", f"Bearer {self.admin_token}"),) if self.admin_token else ()

    def toolstack(self) -> toolstack_pb2_grpc.ToolstackStub:
        return toolstack_pb2_grpc.ToolstackStub(grpc.insecure_channel(self.address))

    def log(self) -> str:
        """Everything the server wrote to stderr (up to its stop, once stopped)."""
        if self._final_log is not None:
            return self._final_log
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not stop in time; returns the exit status."""
        if self._final_log is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.killed = True
                    self.process.kill()
                    self.process.wait()
            self._final_log = self.log()
            self.process.stdout.close()
            self.stderr.close()
        return self.process.returncode


def machine_frames(nr_domains: int, nr_pages: int) -> int:
    """Machine memory for a run of `nr_domains` guests of `nr_pages`: room for all of them
    twice over (restarted runs, the shared-info and Xen frames), and never under 512 MiB."""
    return max(1 << 17, 2 * nr_domains * nr_pages)


def server_command(*args: str, frames: int = 1 << 16, listen: str = "127.0.0.1:0") -> list[str]:
    return [sys.executable, "-m", "hypervisor", "serve", "--listen", listen, "--frames", str(frames), *args]


@contextmanager
def hypervisor_server(*args: str, frames: int = 1 << 16, admin_token: str | None = None, listen: str = "127.0.0.1:0") -> Iterator[Server]:
    """`python -m hypervisor serve` (on a free loopback port unless `listen` says otherwise)
    until the block ends; without `admin_token` it runs with --insecure-no-admin-token."""
    auth = ("--admin-token", admin_token) if admin_token else ("--insecure-no-admin-token",)
    stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(server_command(*auth, *args, frames=frames, listen=listen), stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)  # Ctrl-C reaches us, not it
    server = Server("", None, {}, process, stderr)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            ready = json.loads(process.stdout.readline() or "{}") if selector.select(START_TIMEOUT) else {}
        if ready.get("event") != "ready":
            raise RuntimeError(f"the hypervisor did not start within {START_TIMEOUT} s (exit status {process.poll()}):\n{server.log()}")
        server.address, server.admin_token, server.ready = ready["listen"], ready["admin_token"], ready
        yield server
    finally:
        server.stop()


def create_domain(server: Server, nr_pages: int, nr_vcpus: int, highmem_pages: int = 0, name: str = "") -> toolstack_pb2.CreateDomainResponse:
    request = toolstack_pb2.CreateDomainRequest(nr_pages=nr_pages, nr_vcpus=nr_vcpus, highmem_pages=highmem_pages, name=name)
    return server.toolstack().CreateDomain(request, metadata=server.metadata(), timeout=30)


def destroy_and_audit(stub: toolstack_pb2_grpc.ToolstackStub, metadata, domid: int) -> list[str]:
    """Destroy the domain, then audit the whole machine: every finding, as text."""
    stub.DestroyDomain(toolstack_pb2.DestroyDomainRequest(domid=domid), metadata=metadata, timeout=30)
    return [str(f) for f in stub.Audit(toolstack_pb2.AuditRequest(), metadata=metadata, timeout=60).findings]


@dataclass
class VcpuRun:
    reports: list[dict]
    returncodes: list[int]
    stderr: list[str]

    @property
    def bugs(self) -> list[str]:
        return [r["bug"] for r in self.reports if r.get("bug")]

    @property
    def lifecycles(self) -> int:
        return sum(r.get("lifecycles", 0) for r in self.reports)

    def require_work(self, what: str) -> None:
        """A benchmark's figure means nothing if a guest BUGged or did no work: fail loudly."""
        idle = [i for i, r in enumerate(self.reports) if not r.get("lifecycles")]
        if self.bugs or idle:
            raise RuntimeError(f"{what}: kernel BUGs {self.bugs}, no process lifecycle on vCPU processes {idle}; the figure would not measure running guests")


def vcpu_command(address: str, token: str, vcpu: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "guestlib.vcpu", "--server", address, f"--token={token}", "--vcpu", str(vcpu), *args]  # a token may start with "-"


def claim_command(address: str, tokens: list[str], *args: str) -> list[str]:
    """A vCPU process that runs as the first free vCPU of these domains (guestlib.vcpu --claim)."""
    return [sys.executable, "-m", "guestlib.vcpu", "--server", address, *(f"--token={t}" for t in tokens), "--claim", *args]


def run_vcpus(address: str, token: str, nr_vcpus: int, *args: str, timeout: float = VCPU_TIMEOUT) -> VcpuRun:
    """One `guestlib.vcpu` process per vCPU with `args`; waits for all (killing any past the
    timeout) and returns their JSON reports."""
    return run_processes([vcpu_command(address, token, v, *args) for v in range(nr_vcpus)], timeout)


def run_processes(commands: list[list[str]], timeout: float = VCPU_TIMEOUT) -> VcpuRun:
    """Run these vCPU process commands at once, as `run_vcpus` does."""
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in commands]
    reports, codes, errors = [], [], []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            lines = out.strip().splitlines()
            reports.append(json.loads(lines[-1]) if lines else {"bug": f"no report (exit status {proc.returncode}): {err[-2000:]}"})
            codes.append(proc.returncode)
            errors.append(err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return VcpuRun(reports, codes, errors)
