"""Transport benchmarks: what a guest pays per hypercall and per batched entry, end to end.

One guestlib client (trio, the grpc bridge, the vCPU's Session) talks to a hypervisor server
subprocess on a free loopback port. The echo is the floor of that same stack, as
docs/transport.md section 4 says it must be for the ratio to mean anything; echo and
hypercall calls alternate one by one and the 512-entry batches follow in each round, so the
noise of these shared machines hits all three alike (README.md, Benchmarks).
"""

import json
import statistics
import time

import trio

from guestlib import Toolstack, connect, ops
from guestlib.layout import BootLayout
from guestlib.xen import ENTRIES_PER_TABLE, PAGE_SHIFT, Pte
from xensim import launch
from xensim.bench.client_cpu import WARMUP, command, stat_cpu_s
from xensim.launch import create_domain, hypervisor_server, python_command, started
from xensim.v1 import hypercalls_pb2

ROUNDS = 7
CALLS_PER_ROUND = 200  # of each of echo and hypercall
BATCHES_PER_ROUND = 20
_DATA = int(Pte.PRESENT | Pte.RW | Pte.ACCESSED | Pte.DIRTY)


async def _batches(xen, layout: BootLayout) -> dict[str, list]:
    """Two pairs of 512-entry mmu_update batches, each pair alternated so every run changes
    memory. `raw`: plain writes into a data page (Xen's checked write to a frame that is not a
    pagetable), what the RPC path costs with the least work in the core. `remap`: every entry
    of a pinned L1 moved between two sets of data pages and back, so each entry is validated
    with a reference taken and one dropped, as a guest's munmap + mmap does."""
    raw_pfn, l1_pfn = layout.alloc(), layout.alloc()
    raw, l1 = (layout.mfn(pfn) << PAGE_SHIFT for pfn in (raw_pfn, l1_pfn))
    data = [[layout.mfn(layout.alloc()) for _ in range(ENTRIES_PER_TABLE)] for _ in range(2)]
    remap = [[(l1 + 8 * i, (mfn << PAGE_SHIFT) | _DATA) for i, mfn in enumerate(pages)] for pages in data]
    setup = [ops.mmu_update(remap[0]), ops.mmu_update([layout.remap(l1_pfn, False)]), ops.pin_table(1, layout.mfn(l1_pfn))]
    for step in await xen.submit(setup, stop_on_error=True):
        step.result()
    return {
        "raw": [[(raw + 8 * i, i + k) for i in range(ENTRIES_PER_TABLE)] for k in (1, 2)],
        "remap": remap[::-1],  # the L1 maps the first set now
    }


async def _timed(fn) -> float:
    start = time.perf_counter_ns()
    await fn()
    return (time.perf_counter_ns() - start) / 1e3


async def _measure(address: str) -> dict:
    """Median round trip (us) per round of: echo, hypercall, and each kind of batch."""
    async with Toolstack(address) as xl:
        created = await xl.create_domain(nr_pages=4096, nr_vcpus=1, name="bench-rpc")
        try:
            async with connect(address, created.token, 0) as xen:
                await xen.wait_started()
                batches = await _batches(xen, await BootLayout.read(xen, created.start_info))
                rounds = {name: [] for name in ("echo", "hypercall", *batches)}
                for _ in range(ROUNDS):
                    pairs = [(await _timed(lambda: xen.echo(b"")), await _timed(xen.tlb_flush_local)) for _ in range(CALLS_PER_ROUND)]
                    rounds["echo"].append(statistics.median(echo for echo, _ in pairs))
                    rounds["hypercall"].append(statistics.median(hypercall for _, hypercall in pairs))
                    for name, pair in batches.items():
                        times = [await _timed(lambda i=i, pair=pair: xen.mmu_update(pair[i % 2])) for i in range(BATCHES_PER_ROUND)]
                        rounds[name].append(statistics.median(times))
        finally:
            await xl.destroy_domain(created.domid)
        findings = await xl.audit()
    if findings:
        raise RuntimeError(f"the benchmark left the hypervisor inconsistent: {findings[:5]}")
    return _report(**rounds)


def _report(echo: list[float], hypercall: list[float], raw: list[float], remap: list[float]) -> dict:
    context = {"rounds": ROUNDS, "client": "guestlib (trio + grpc bridge), one Session, 1 in flight"}
    ratios = [h / e for h, e in zip(hypercall, echo)]
    rate = {name: statistics.median(ENTRIES_PER_TABLE / (t / 1e6) for t in times) for name, times in (("raw", raw), ("remap", remap))}
    return {
        "rpc.echo_rtt_us": {"value": statistics.median(echo), "unit": "us", "per_round": echo, "calls_per_round": CALLS_PER_ROUND, **context},
        "rpc.hypercall_rtt_us": {
            "value": statistics.median(hypercall),
            "unit": "us",
            "hypercall": "mmuext_op MMUEXT_TLB_FLUSH_LOCAL",
            "per_round": hypercall,
            "calls_per_round": CALLS_PER_ROUND,
            **context,
        },
        "rpc.hypercall_rtt_over_echo": {"value": statistics.median(ratios), "unit": "ratio", "per_round": ratios, "target": "<= 1.25", **context},
        "rpc.mmu_update_batch_entries_per_s": {
            "value": rate["raw"],
            "unit": "entries/s",
            "batch": "one 512-entry mmu_update per message: checked writes into a data page",
            "batch_rtt_us_per_round": raw,
            "pinned_l1_remap_entries_per_s": rate["remap"],
            "pinned_l1_remap_batch_rtt_us_per_round": remap,
            "batches_per_round": BATCHES_PER_ROUND,
            "target": ">= 4e5",
            **context,
        },
    }


CPU_ROUNDS = 5
CPU_MESSAGES = 1000


def _client_cpu(server) -> dict:
    """`rpc.vcpu_cpu_us_per_msg_over_grpc_floor`: a vCPU's own stack against a bare grpcio
    stream client, each in its own process sending the same one-hypercall message one at a
    time, taking turns round after round (xensim.bench.client_cpu)."""
    token = create_domain(server, nr_pages=4096, nr_vcpus=1, name="bench-cpu").token
    rounds = {"floor": [], "guest": []}
    for _ in range(CPU_ROUNDS):
        for kind, results in rounds.items():
            done = launch.run(command(kind, server.address, token, 0, CPU_MESSAGES), timeout=300)
            if done.returncode:
                raise RuntimeError(f"a client_cpu process failed (exit status {done.returncode}): {done.stderr[-2000:]}")
            results.append(json.loads(done.stdout)["cpu_us"])
    ratios = [g / f for g, f in zip(rounds["guest"], rounds["floor"])]
    return {
        "rpc.vcpu_cpu_us_per_msg_over_grpc_floor": {
            "value": statistics.median(ratios),
            "unit": "ratio",
            "per_round": ratios,
            "vcpu_cpu_us_per_msg": statistics.median(rounds["guest"]),
            "grpc_floor_cpu_us_per_msg": statistics.median(rounds["floor"]),
            "messages_per_round": CPU_MESSAGES,
            "message": "one MMUEXT_TLB_FLUSH_LOCAL, answered before the next",
            "floor": "bare grpcio sync-stub bidi stream, pre-serialized bytes",
            "target": "<= 1.5",
        }
    }


SERVER_ROUNDS = 7
SERVER_MESSAGES = 4000
# What the hypervisor answers one MMUEXT_TLB_FLUSH_LOCAL, a few seconds after it started: the
# bare server answers these bytes, so both servers send messages of one size.
ANSWER = hypercalls_pb2.SessionResponse(
    request_id=SERVER_MESSAGES, system_time_ns=10**10, results=[hypercalls_pb2.CallResult(mmuext_op=hypercalls_pb2.MmuextOpResponse(done=1))]
).SerializeToString()


def process_cpu_s(pid: int) -> float:
    """CPU (user + system, every thread, exited ones included) that process `pid` has used."""
    return stat_cpu_s(f"/proc/{pid}/stat")


def _server_cpu(server) -> dict:
    """`rpc.server_cpu_us_per_msg_over_grpc_floor`: the hypervisor's CPU per Session message
    against a bare grpc.aio stream server's (xensim.bench.bare_server) answering as many bytes,
    both driven by the same bare grpcio client (client_cpu's `floor`), taking turns round after
    round. Each figure is the server process's whole CPU over one client's run (its connection,
    warm-up and SERVER_MESSAGES messages) divided by its messages. The key is the ratio of the
    medians: on these loaded machines one run of either server can cost twice another, and a
    round's two runs do not move together."""
    token = create_domain(server, nr_pages=4096, nr_vcpus=1, name="bench-server-cpu").token
    rounds = {"floor": [], "server": []}
    with started(python_command("xensim.bench.bare_server", ANSWER.hex())) as bare:
        address = json.loads(bare.process.stdout.readline() or "{}").get("listen")
        if address is None:
            raise RuntimeError(f"the bare grpc server did not start: {bare.log()[-2000:]}")
        targets = {"floor": (bare.pid, address), "server": (server.pid, server.address)}
        for _ in range(SERVER_ROUNDS):
            for kind, results in rounds.items():
                pid, where = targets[kind]
                before = process_cpu_s(pid)
                done = launch.run(command("floor", where, token, 0, SERVER_MESSAGES), timeout=300)
                if done.returncode:
                    raise RuntimeError(f"a client_cpu process failed (exit status {done.returncode}): {done.stderr[-2000:]}")
                messages = json.loads(done.stdout)["messages"] + 1 + WARMUP  # the first message, then the warm-up's
                results.append((process_cpu_s(pid) - before) / messages * 1e6)
    server_us, floor_us = statistics.median(rounds["server"]), statistics.median(rounds["floor"])
    return {
        "rpc.server_cpu_us_per_msg_over_grpc_floor": {
            "value": server_us / floor_us,
            "unit": "ratio",
            "per_round": [s / f for s, f in zip(rounds["server"], rounds["floor"])],
            "server_cpu_us_per_msg": server_us,
            "grpc_floor_cpu_us_per_msg": floor_us,
            "messages_per_round": SERVER_MESSAGES,
            "message": "one MMUEXT_TLB_FLUSH_LOCAL, answered before the next, from a bare grpcio client",
            "floor": "bare grpc.aio stream server (one loop, no serializers) answering bytes of the same size",
            "target": "<= 1.5",
        }
    }


def run() -> dict:
    with hypervisor_server() as server:
        return trio.run(_measure, server.address) | _client_cpu(server) | _server_cpu(server)
