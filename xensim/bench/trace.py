"""What tracing costs a run: the demo's workload with and without a trace, side by side.

`trace.traced_over_untraced_lifecycles_per_s`: process lifecycles per second of the demo's
guest (4 vCPU processes, 16384 pages) on a server that traces to a .gz file, as the demo does
by default, over the same on a server that does not trace. The two alternate, ROUNDS times
each, so the noise of a shared machine hits both alike. `trace.bytes_per_call`: the trace's
bytes per recorded call, as the encoding writes them (before gzip), with the gzip file's
beside it. Beside the ratio, the server process's CPU time per call in each mode (what a
traced call costs the server), and the same ratio per CPU second of the server and the vCPU
processes: the throughput a machine of our own would see, which other users' load on a
shared one moves far less than it moves the ratio per wall-clock second.
"""

import gzip
import os
import resource
import tempfile

from xensim.launch import create_domain, hypervisor_server, run_vcpus
from xensim.v1 import toolstack_pb2

ROUNDS = 3
SECONDS = 5.0
VCPUS, PAGES = 4, 16384  # the demo's defaults


def _cpu_s(pid: int) -> float:
    """User and system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _calls(server) -> int:
    return sum(c.count for c in server.toolstack().Stats(toolstack_pb2.StatsRequest(), metadata=server.metadata(), timeout=60).counts)


def _children_cpu_s() -> float:
    """User and system CPU time of this process's children that have ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(trace: str | None) -> tuple[int, int, float, float]:
    """(lifecycles, calls, server CPU seconds, vCPU processes' CPU seconds) of one run of the
    workload on a new server."""
    with hypervisor_server(*(("--trace", trace) if trace else ())) as server:
        domain = create_domain(server, nr_pages=PAGES, nr_vcpus=VCPUS)
        calls, cpu, vcpus_cpu = _calls(server), _cpu_s(server.process.pid), _children_cpu_s()
        work = run_vcpus(server.address, domain.token, VCPUS, "--seconds", str(SECONDS), "--seed", "11")
        calls, cpu, vcpus_cpu = _calls(server) - calls, _cpu_s(server.process.pid) - cpu, _children_cpu_s() - vcpus_cpu
        if trace:
            server.toolstack().StopTrace(toolstack_pb2.StopTraceRequest(), metadata=server.metadata(), timeout=60)
    work.require_work("trace.*")
    return work.lifecycles, calls, cpu, vcpus_cpu


def _encoded_bytes(path: str) -> int:
    with gzip.open(path, "rb") as trace:
        return sum(len(chunk) for chunk in iter(lambda: trace.read(1 << 20), b""))


def run() -> dict:
    lifecycles, calls, cpu, all_cpu = {False: 0, True: 0}, {False: 0, True: 0}, {False: 0.0, True: 0.0}, {False: 0.0, True: 0.0}
    encoded = stored = 0
    with tempfile.TemporaryDirectory(prefix="xensim-bench-trace-") as directory:
        for i in range(ROUNDS):
            for traced in (False, True):
                path = os.path.join(directory, f"run{i}.trace.gz") if traced else None
                done, made, used, vcpus_used = _run(path)
                lifecycles[traced] += done
                calls[traced] += made
                cpu[traced] += used
                all_cpu[traced] += used + vcpus_used
                if path:
                    encoded += _encoded_bytes(path)
                    stored += os.path.getsize(path)
    untraced, traced = (lifecycles[t] / (ROUNDS * SECONDS) for t in (False, True))
    cpu_us = {t: 1e6 * cpu[t] / max(calls[t], 1) for t in (False, True)}
    per_cpu_s = {t: lifecycles[t] / all_cpu[t] for t in (False, True)}
    return {
        "trace.traced_over_untraced_lifecycles_per_s": {
            "value": traced / untraced,
            "unit": "ratio",
            "traced_lifecycles_per_s": traced,
            "untraced_lifecycles_per_s": untraced,
            "traced_server_cpu_us_per_call": cpu_us[True],
            "untraced_server_cpu_us_per_call": cpu_us[False],
            "traced_over_untraced_lifecycles_per_cpu_s": per_cpu_s[True] / per_cpu_s[False],
            "vcpu_processes": VCPUS,
            "seconds": ROUNDS * SECONDS,
            "target": ">= 0.9",
        },
        "trace.bytes_per_call": {"value": encoded / max(calls[True], 1), "unit": "bytes", "gzip_bytes_per_call": stored / max(calls[True], 1), "calls": calls[True]},
    }
