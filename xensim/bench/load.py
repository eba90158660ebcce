"""Load: 64 busy vCPU streams (8 domains of 8 vCPUs) hammering hypercalls and IPIs at once.

One client process per domain (`python -m xensim.bench.load ADDRESS TOKEN SECONDS`) holds a
Session per vCPU (guestlib, trio). vCPU 0 maps the shared-info frame, binds an IPI port per
vCPU and brings the others up; each vCPU then handles its port with guestlib's EventChannels
and, for SECONDS, repeats one message: an IPI to the next vCPU (EVTCHNOP_send) and a hypercall
(MMUEXT_TLB_FLUSH_LOCAL), timing each round trip. The clients start together (each says
`ready`, then waits for `go` on stdin), so every stream competes with all the others.

Reported: fairness (the slowest stream's message rate over the median: no stream starves),
p99 of the round trips, the rates, and the server's resident memory before and after, which
stays flat because events coalesce (a port pending twice is pending once).
"""

import json
import select
import statistics
import sys
import time
from contextlib import AsyncExitStack, ExitStack

import trio

from guestlib import EventChannels, connect, ops
from guestlib.xen import PAGE_SHIFT, UVMF_INVLPG, Pte
from xensim.launch import Child, create_domain, destroy_and_audit, hypervisor_server, python_command, started

DOMAINS = 8
VCPUS = 8
SECONDS = 10.0
READY_TIMEOUT = 120.0
_SHARED_INFO_PTE = int(Pte.PRESENT | Pte.RW | Pte.ACCESSED | Pte.DIRTY)


# -- a client process: one domain, a Session per vCPU --------------------------------------------


async def _boot(clients) -> tuple[list[int], list[EventChannels]]:
    """vCPU 0 maps shared info at its first free pfn's direct-map address, binds one IPI port
    per vCPU and brings vCPUs 1.. up on the boot page table; each vCPU handles its own port."""
    info = (await clients[0].wait_started()).start_info
    shared_info_va = info.page_offset + (info.first_free_pfn << PAGE_SHIFT)
    await clients[0].update_va_mapping(shared_info_va, info.shared_info | _SHARED_INFO_PTE, UVMF_INVLPG)
    ports = [p.result() for p in await clients[0].submit([ops.evtchn_bind_ipi(v) for v in range(len(clients))])]
    bring_up = [call for v in range(1, len(clients)) for call in (ops.vcpu_initialise(v, info.pt_base_mfn), ops.vcpu_up(v))]
    for step in await clients[0].submit(bring_up, stop_on_error=True):
        step.result()
    for client in clients[1:]:
        await client.wait_started()
    return ports, [EventChannels(client, shared_info_va, v) for v, client in enumerate(clients)]


async def client(address: str, token: str, seconds: float) -> dict:
    """Run one domain's vCPUs; the report has each vCPU's messages, IPIs handled and round
    trips (us)."""
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(address, token, v)) for v in range(VCPUS)]
        ports, events = await _boot(clients)
        ipis = [0] * VCPUS
        latencies: list[list[int]] = [[] for _ in range(VCPUS)]

        def handler(v: int):
            async def handle(port, tail) -> None:
                ipis[v] += 1

            return handle

        async def hammer(v: int, deadline: float) -> None:
            message = [ops.evtchn_send(ports[(v + 1) % VCPUS]), ops.tlb_flush_local()]
            while time.monotonic() < deadline:
                start = time.perf_counter_ns()
                for call in await clients[v].submit(message):
                    call.result()
                latencies[v].append((time.perf_counter_ns() - start) // 1000)

        async with trio.open_nursery() as upcalls:
            for v, channels in enumerate(events):
                channels.bind(ports[v], handler(v))
                upcalls.start_soon(channels.run)
                await channels.local_irq_enable()
            print(json.dumps({"event": "ready"}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # "go"
            deadline = time.monotonic() + seconds
            async with trio.open_nursery() as work:
                for v in range(VCPUS):
                    work.start_soon(hammer, v, deadline)
            upcalls.cancel_scope.cancel()
    return {"messages": [len(samples) for samples in latencies], "ipis": ipis, "latencies_us": latencies}


# -- the run: a server, the domains, the client processes ----------------------------------------


def rss_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now and at its peak (/proc/PID/status), in MB."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[key].split()[0]) / 1024 for name, key in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def _ready(client: Child, deadline: float) -> None:
    """Wait for the client's `ready` line (it has booted its domain's vCPUs)."""
    readable, _, _ = select.select([client.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
    if not readable or json.loads(client.process.stdout.readline() or "{}").get("event") != "ready":
        raise RuntimeError(f"a load client did not get ready (exit status {client.stop()}): {client.log()[-2000:]}")


def measure(seconds: float = SECONDS) -> dict:
    """Run the load for `seconds` and return the per-stream rates, round trips and memory."""
    with hypervisor_server() as server:
        domains = [create_domain(server, nr_pages=1024, nr_vcpus=VCPUS, name=f"load{i}") for i in range(DOMAINS)]
        with ExitStack() as stack:
            clients = [stack.enter_context(started(python_command("xensim.bench.load", server.address, d.token, str(seconds)), stdin=True)) for d in domains]
            deadline = time.monotonic() + READY_TIMEOUT
            for client in clients:
                _ready(client, deadline)
            before = rss_mb(server.pid)
            for client in clients:
                client.process.stdin.write("go\n")
                client.process.stdin.flush()
            reports = []
            for client in clients:
                out = client.finish(seconds + READY_TIMEOUT)
                if client.process.returncode:
                    raise RuntimeError(f"a load client failed (exit status {client.process.returncode}): {client.log()[-2000:]}")
                reports.append(json.loads(out.strip().splitlines()[-1]))
            after = rss_mb(server.pid)
        stub = server.toolstack()
        findings = [f for d in domains for f in destroy_and_audit(stub, server.metadata(), d.domid)]
    if findings:
        raise RuntimeError(f"the load left the hypervisor inconsistent: {findings[:5]}")
    return {"seconds": seconds, "reports": reports, "rss_before": before, "rss_after": after}


def summary(run: dict) -> dict:
    """The keys: fairness and p99, with the rates and memory as context."""
    counts = sorted(n for report in run["reports"] for n in report["messages"])
    rates = [n / run["seconds"] for n in counts]
    latencies = sorted(us for report in run["reports"] for stream in report["latencies_us"] for us in stream)
    median = statistics.median(rates)
    context = {
        "streams": len(rates),
        "client_processes": len(run["reports"]),
        "seconds": run["seconds"],
        "message": "EVTCHNOP_send to the next vCPU + MMUEXT_TLB_FLUSH_LOCAL, one Session message",
        "rate_min": rates[0],
        "rate_median": median,
        "rate_max": rates[-1],
        "rate_unit": "messages/s per stream",
        "round_trips_min": counts[0],
        "ipis_handled_min": min(n for report in run["reports"] for n in report["ipis"]),
        "server_rss_mb_before": run["rss_before"]["rss"],
        "server_rss_mb_after": run["rss_after"]["rss"],
        "server_rss_mb_peak": run["rss_after"]["peak"],
    }
    return {
        "load.streams_64_min_over_median_rate": {"value": rates[0] / median, "unit": "ratio", "target": ">= 0.5", **context},
        "load.hypercall_p99_us": {
            "value": latencies[int(0.99 * (len(latencies) - 1))],
            "unit": "us",
            "p50_us": latencies[len(latencies) // 2],
            "max_us": latencies[-1],
            "round_trips": len(latencies),
            **context,
        },
    }


def run() -> dict:
    return summary(measure())


if __name__ == "__main__":
    address, token, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    print(json.dumps(trio.run(client, address, token, seconds)), flush=True)
