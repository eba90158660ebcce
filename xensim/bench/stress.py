"""Whole-system benchmarks: the stress workload's throughput, its cost in messages, its
message rate against a bare echo load of as many processes, and the server's memory with
four 256 MiB guests running.

`stress.*`: one domain, eight vCPU processes, the fork / touch / verify / munmap / exit
workload for a fixed time, right after eight echo processes, then eight bare grpcio stream
clients (xensim.bench.client_cpu), ran for as long on a domain of the same server (so all
three see the same machine). `server.rss_mb_4x256`: the hypervisor
process's resident memory (VmRSS) after four domains of 65536 pages have booted and run.
"""

import json
from contextlib import ExitStack

from xensim.bench.client_cpu import command as client_command
from xensim.bench.rpc import process_cpu_s
from xensim.launch import create_domain, hypervisor_server, python_command, run_processes, run_vcpus, started, vcpu_command

SECONDS = 8.0
PROCESSES = 8
MIB_256 = 65536  # pages of 4 KiB


def _echo_rate(address: str, token: str) -> float:
    """Echo messages per second, summed over PROCESSES echo processes at once."""
    with ExitStack() as stack:
        clients = [stack.enter_context(started(python_command("xensim.bench.echo_load", address, token, str(v), str(SECONDS)))) for v in range(PROCESSES)]
        return sum(int(c.finish(SECONDS + 60)) for c in clients) / SECONDS


def _grpc_stream_rate(address: str, token: str) -> float:
    """Messages per second of PROCESSES bare grpcio stream clients at once: what the machine
    carries with no guest stack at all."""
    with ExitStack() as stack:
        clients = [stack.enter_context(started(client_command("floor", address, token, v, seconds=SECONDS))) for v in range(PROCESSES)]
        return sum(json.loads(c.finish(SECONDS + 60))["messages"] for c in clients) / SECONDS


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


def run() -> dict:
    with hypervisor_server() as server:
        echo = create_domain(server, nr_pages=4096, nr_vcpus=PROCESSES)
        cpu = process_cpu_s(server.pid)
        echo_rate = _echo_rate(server.address, echo.token)
        echo_cpu = process_cpu_s(server.pid) - cpu
        grpc_rate = _grpc_stream_rate(server.address, echo.token)
        domain = create_domain(server, nr_pages=16384, nr_vcpus=PROCESSES)
        cpu = process_cpu_s(server.pid)
        work = run_vcpus(server.address, domain.token, PROCESSES, "--seconds", str(SECONDS), "--seed", "11")
        stress_cpu = process_cpu_s(server.pid) - cpu
    work.require_work("stress.*")
    messages = sum(r["messages"] for r in work.reports)
    with hypervisor_server(frames=4 * (MIB_256 + 1) + 4096) as server:
        guests = [create_domain(server, nr_pages=MIB_256, nr_vcpus=1) for _ in range(4)]
        big = run_processes([vcpu_command(server.address, g.token, 0, "--seconds", "3") for g in guests])
        rss = _rss_mb(server.process.pid)
    big.require_work("server.rss_mb_4x256")
    return {
        "stress.lifecycles_per_s": {
            "value": work.lifecycles / SECONDS,
            "unit": "lifecycles/s",
            "vcpu_processes": PROCESSES,
            "seconds": SECONDS,
            "grpc_stream_messages_per_s": grpc_rate,
        },
        "stress.grpc_stream_messages_per_s": {"value": grpc_rate, "unit": "messages/s", "clients": PROCESSES, "client": "bare grpcio sync-stub stream, bytes"},
        "stress.rpcs_per_lifecycle": {"value": messages / max(work.lifecycles, 1), "unit": "messages", "target": "<= 16"},
        "stress.rpc_rate_over_echo": {
            "value": messages / SECONDS / echo_rate,
            "unit": "ratio",
            "stress_messages_per_s": messages / SECONDS,
            "echo_messages_per_s": echo_rate,
            # The hypervisor's CPU (every thread) per message of each run, boot included for
            # stress: what a message costs the server beside what it costs the guests
            # (docs/transport.md section 7).
            "server_cpu_us_per_stress_msg": stress_cpu / max(messages, 1) * 1e6,
            "server_cpu_us_per_echo_msg": echo_cpu / max(echo_rate * SECONDS, 1) * 1e6,
            "target": ">= 0.6",
        },
        "server.rss_mb_4x256": {"value": rss, "unit": "MB", "domains": 4, "pages_each": MIB_256, "target": "<= 150"},
    }
