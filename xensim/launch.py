"""Starting the pieces as real processes: a hypervisor server, domains, vCPU processes.

The programs (bench, demo, stress, guest) and the tests run the simulator the way a user does:
the hypervisor is `python -m hypervisor serve` on a free loopback port, domains are made
through the Toolstack service, and each vCPU is `python -m guestlib.vcpu` in its own process.

This module is the one place that builds the command of a project process and starts it, so
that every one is started alike (tests/test_launch.py fails on a spawn elsewhere):
- in its own process group, so that a Ctrl-C in the terminal reaches the program, which then
  stops its processes in order (the vCPUs, the audit, the hypervisor) rather than all at once.
  The hypervisor alone gets a session of its own: with Linux's scheduler autogroups (on by
  default) a session is a scheduling group, so under load the hypervisor keeps half the CPU
  against all the clients together, as a separate host would, instead of one share among
  theirs (with every client in a session of its own, the 64-stream p99 grew from about 60 to
  about 300 ms);
- stdin from /dev/null unless asked for, stdout a pipe (reports are JSON lines there), stderr
  into an unnamed temporary file, which a chatty child can never fill up and block on;
- stopped when the block that started it ends (a context manager: SIGKILL, or SIGTERM first
  for the hypervisor, which then ends its streams and its trace cleanly);
- on Linux, with a parent-death signal (prctl PR_SET_PDEATHSIG, set by setpriv), so that a
  program that is itself killed (SIGKILL, or SIGTERM before it could stop them) leaves no
  process behind.
  That signal comes when the *thread* that started the child ends, so children are started
  from the caller's own thread, never from a worker thread (trio.lowlevel.open_process uses
  one, whose exit after ten idle seconds would kill the child): hence `opened` below.
"""

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import trio

from xensim.v1 import toolstack_pb2, toolstack_pb2_grpc

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
VCPU_TIMEOUT = 300.0
TRACE_CACHE_BYTES = 256 << 20  # a 20 s demo writes ~2.5 MB
SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None  # util-linux, on every Debian and Ubuntu


def default_trace() -> str:
    """Where a demo's trace goes unless --trace says: a new file in the per-user cache
    ($XDG_CACHE_HOME/xensim/traces, else ~/.cache/...), whose oldest traces are removed so
    that those kept stay under TRACE_CACHE_BYTES."""
    directory = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xensim" / "traces"
    directory.mkdir(parents=True, exist_ok=True)
    kept = 0
    for trace in sorted(directory.glob("demo-*.gz"), key=lambda p: p.stat().st_mtime, reverse=True):  # .jsonl.gz: format 2's
        kept += trace.stat().st_size
        if kept > TRACE_CACHE_BYTES:
            trace.unlink(missing_ok=True)
    return str(directory / f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.trace.gz")


def python(*args: str) -> list[str]:
    """This interpreter with `args` (the inherited cwd finds a checkout's modules)."""
    return [sys.executable, *args]


def python_command(module: str, *args: str) -> list[str]:
    """`python -m module args` with this interpreter."""
    return python("-m", module, *args)


def xensim_command(*args: str) -> list[str]:
    """An `xensim ...` program, as a user runs it."""
    return python_command("xensim.cli", *args)


def _dying_with_parent(command: list[str], signum: int) -> list[str]:
    """`command` run through util-linux's setpriv, which asks Linux (prctl PR_SET_PDEATHSIG,
    kept across the exec) to send it `signum` when its parent dies; unchanged where there is
    no setpriv. Not a preexec_fn: that forces a fork() of this process, whose grpc does not
    survive it (grpc's epoll wakeup check aborted such children, ev_epoll1_linux.cc), where
    subprocess otherwise uses vfork."""
    return [SETPRIV, f"--pdeathsig={signal.Signals(signum).name}", "--", *command] if SETPRIV else command


def _popen(command: list[str], stdin, stdout, stderr, env: dict[str, str] | None, dies_with: int, text: bool, session: bool = False) -> subprocess.Popen:
    """subprocess.Popen under the conventions above (`session`: a session of its own)."""
    group = {"start_new_session": True} if session else {"process_group": 0}
    return subprocess.Popen(_dying_with_parent(command, dies_with), stdin=stdin, stdout=stdout, stderr=stderr, env=env, text=text, **group)


class Child:
    """A started process: `process` (its stdout a text pipe), its stderr so far (`log()`)."""

    def __init__(self, process: subprocess.Popen, stderr):
        self.process, self.pid = process, process.pid
        self.killed = False  # it did not stop within STOP_TIMEOUT of the first signal
        self._stderr, self._final_log = stderr, None

    def log(self) -> str:
        """Everything it wrote to stderr (up to its stop, once stopped)."""
        if self._final_log is not None:
            return self._final_log
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def finish(self, timeout: float) -> str:
        """Its whole stdout, once it has exited (subprocess.TimeoutExpired past `timeout`)."""
        return self.process.communicate(timeout=timeout)[0]

    def stop(self, signum: int = signal.SIGKILL) -> int:
        """`signum` if it still runs, then SIGKILL if it does not stop in time; its exit status."""
        if self._final_log is None:
            if self.process.poll() is None:
                self.process.send_signal(signum)
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.killed = True
                    self.process.kill()
                    self.process.wait()
            self._final_log = self.log()
            for pipe in (self.process.stdin, self.process.stdout, self._stderr):
                if pipe is not None:
                    pipe.close()
        return self.process.returncode


@contextmanager
def started(command: list[str], *, stdin: bool = False, env: dict[str, str] | None = None, stop: int = signal.SIGKILL, kind: type[Child] = Child) -> Iterator[Child]:
    """Start `command` for the block (with a stdin pipe if asked) as a `kind`; stop it
    (`stop`, which is also its parent-death signal, then SIGKILL) when the block ends."""
    stderr = tempfile.TemporaryFile()
    try:
        child = kind(_popen(command, subprocess.PIPE if stdin else subprocess.DEVNULL, subprocess.PIPE, stderr, env, stop, text=True, session=kind is Server), stderr)
    except BaseException:
        stderr.close()
        raise
    try:
        yield child
    finally:
        child.stop(stop)


def run(command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `command` to its end (killed past `timeout`: subprocess.TimeoutExpired)."""
    with started(command, env=env) as child:
        out = child.finish(timeout)
    return subprocess.CompletedProcess(command, child.process.returncode, out, child.log())


class AsyncChild(Child):
    """A started process for trio: `stdout` (and `stdin`) are trio streams, `wait()` awaits."""

    def __init__(self, process: subprocess.Popen, stderr, stdin: trio.lowlevel.FdStream | None, stdout: trio.lowlevel.FdStream):
        super().__init__(process, stderr)
        self.stdin, self.stdout = stdin, stdout

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        """Its exit status, once it has exited (a pidfd becomes readable then: Linux 5.3)."""
        if self.process.poll() is None:
            pidfd = os.pidfd_open(self.pid)
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
        return self.process.wait()


@asynccontextmanager
async def opened(command: list[str], *, stdin: bool = False, env: dict[str, str] | None = None, stop: int = signal.SIGKILL, session: bool = False) -> AsyncIterator[AsyncChild]:
    """`started` for trio: the process is started from this (trio's) thread, and stopped
    (`stop`, then SIGKILL if it does not stop within STOP_TIMEOUT) and waited for, shielded from
    cancellation, when the block ends."""
    stderr = tempfile.TemporaryFile()
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe() if stdin else (subprocess.DEVNULL, None)
    try:
        process = _popen(command, in_r, out_w, stderr, env, stop, text=False, session=session)
    except BaseException:
        for fd in (out_r, out_w, in_w):
            if fd is not None:
                os.close(fd)
        stderr.close()
        raise
    finally:
        if stdin:
            os.close(in_r)
    os.close(out_w)
    child = AsyncChild(process, stderr, trio.lowlevel.FdStream(in_w) if stdin else None, trio.lowlevel.FdStream(out_r))
    try:
        yield child
    finally:
        with trio.CancelScope(shield=True):
            if child.returncode is None:
                process.send_signal(stop)
                with trio.move_on_after(STOP_TIMEOUT):
                    await child.wait()
            if child.returncode is None:
                child.killed = True
                process.kill()
            await child.wait()
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    await stream.aclose()
            child.stop()  # keeps its stderr, closes the file


async def run_async(command: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`run` for trio (cancel the caller's scope for a timeout)."""
    async with opened(command, env=env) as child:
        out = b"".join([chunk async for chunk in child.stdout])
        status = await child.wait()
    return subprocess.CompletedProcess(command, status, out.decode(errors="replace"), child.log())


class Server(Child):
    """A running `python -m hypervisor serve`: where it listens, its ready line, its stderr."""

    address: str = ""
    admin_token: str | None = None
    ready: dict = {}  # its ready line, once read

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What a Toolstack call carries: the admin token, or nothing without one."""
        return (("authorization", f"Bearer {self.admin_token}"),) if self.admin_token else ()

    def toolstack(self) -> toolstack_pb2_grpc.ToolstackStub:
        return toolstack_pb2_grpc.ToolstackStub(grpc.insecure_channel(self.address))

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """SIGTERM (it ends its streams and trace), then SIGKILL if it does not stop in time."""
        return super().stop(signum)


def machine_frames(nr_domains: int, nr_pages: int) -> int:
    """Machine memory for a run of `nr_domains` guests of `nr_pages`: room for all of them
    twice over (restarted runs, the shared-info and Xen frames), and never under 512 MiB."""
    return max(1 << 17, 2 * nr_domains * nr_pages)


def server_command(*args: str, frames: int = 1 << 16, listen: str = "127.0.0.1:0") -> list[str]:
    return python_command("hypervisor", "serve", "--listen", listen, "--frames", str(frames), *args)


@contextmanager
def hypervisor_server(*args: str, frames: int = 1 << 16, admin_token: str | None = None, listen: str = "127.0.0.1:0") -> Iterator[Server]:
    """`python -m hypervisor serve` (on a free loopback port unless `listen` says otherwise)
    until the block ends; without `admin_token` it runs with --insecure-no-admin-token."""
    auth = ("--admin-token", admin_token) if admin_token else ("--insecure-no-admin-token",)
    with started(server_command(*auth, *args, frames=frames, listen=listen), stop=signal.SIGTERM, kind=Server) as server:
        with selectors.DefaultSelector() as selector:
            selector.register(server.process.stdout, selectors.EVENT_READ)
            ready = json.loads(server.process.stdout.readline() or "{}") if selector.select(START_TIMEOUT) else {}
        if ready.get("event") != "ready":
            raise RuntimeError(f"the hypervisor did not start within {START_TIMEOUT} s (exit status {server.process.poll()}):\n{server.log()}")
        server.address, server.admin_token, server.ready = ready["listen"], ready["admin_token"], ready
        yield server


@asynccontextmanager
async def serving(*args: str, frames: int = 1 << 16) -> AsyncIterator[str]:
    """`hypervisor_server` for trio, on a free loopback port with --insecure-no-admin-token
    until the block ends: its address. Many can run at once in one trio run (hunt --workers)."""
    async with opened(server_command("--insecure-no-admin-token", *args, frames=frames), stop=signal.SIGTERM, session=True) as server:
        line = b""
        with trio.move_on_after(START_TIMEOUT):
            async for chunk in server.stdout:
                line += chunk
                if b"\n" in line:
                    break
        ready = json.loads(line.split(b"\n")[0] or "{}") if b"\n" in line else {}
        if ready.get("event") != "ready":
            raise RuntimeError(f"the hypervisor did not start within {START_TIMEOUT} s (exit status {server.returncode}):\n{server.log()}")
        yield ready["listen"]


def create_domain(server: Server, nr_pages: int, nr_vcpus: int, highmem_pages: int = 0, name: str = "", address_size: int = 64) -> toolstack_pb2.CreateDomainResponse:
    request = toolstack_pb2.CreateDomainRequest(nr_pages=nr_pages, nr_vcpus=nr_vcpus, highmem_pages=highmem_pages, name=name, address_size=address_size)
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
    return python_command("guestlib.vcpu", "--server", address, f"--token={token}", "--vcpu", str(vcpu), *args)  # a token may start with "-"


def claim_command(address: str, tokens: list[str], *args: str) -> list[str]:
    """A vCPU process that runs as the first free vCPU of these domains (guestlib.vcpu --claim)."""
    return python_command("guestlib.vcpu", "--server", address, *(f"--token={t}" for t in tokens), "--claim", *args)


def run_vcpus(address: str, token: str, nr_vcpus: int, *args: str, timeout: float = VCPU_TIMEOUT) -> VcpuRun:
    """One `guestlib.vcpu` process per vCPU with `args`; waits for all (killing any past the
    timeout) and returns their JSON reports."""
    return run_processes([vcpu_command(address, token, v, *args) for v in range(nr_vcpus)], timeout)


def run_processes(commands: list[list[str]], timeout: float = VCPU_TIMEOUT) -> VcpuRun:
    """Run these vCPU process commands at once, as `run_vcpus` does."""
    with ExitStack() as stack:
        children = [stack.enter_context(started(command)) for command in commands]
        outs = [child.finish(timeout) for child in children]
    lines = [out.strip().splitlines() for out in outs]
    reports = [json.loads(ls[-1]) if ls else {"bug": f"no report (exit status {c.process.returncode}): {c.log()[-2000:]}"} for ls, c in zip(lines, children)]
    return VcpuRun(reports, [c.process.returncode for c in children], [c.log() for c in children])
