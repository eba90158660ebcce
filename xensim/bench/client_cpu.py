"""A client process for CPU per message: `python -m xensim.bench.client_cpu KIND ADDRESS TOKEN VCPU N|--seconds S`.

KIND `guest` is a vCPU's own stack (guestlib: trio, the Session bridge, protobuf, the typed
client) sending one MMUEXT_TLB_FLUSH_LOCAL per message; KIND `floor` is a bare grpcio stream
client sending the same request bytes (serialized beforehand, answers left unparsed): a
sync-stub bidi stream fed from a queue, the cheapest plain grpcio client measured
(benchmarks/guest_transport.py). Both wait for each answer before the next request. With N it
prints the process CPU (every thread: `time.process_time`) and wall time per message as JSON;
with `--seconds` it prints how many messages it made in that time. With N it also prints each
thread's share (`threads_cpu_us`: `main`, then the others by their name in /proc, where
`python` is every other Python thread (the guest's stream thread; the bare client's request
consumer and channel threads) and `event_engine` grpc core's pollers; read in
docs/transport.md section 7).
"""

import json
import os
import queue
import sys
import time

import grpc
import trio

from xensim.launch import python_command
from xensim.v1 import hypercalls_pb2

WARMUP = 100
SESSION = "/xensim.v1.Hypercalls/Session"
TLB_FLUSH_LOCAL = hypercalls_pb2.Call(mmuext_op=hypercalls_pb2.MmuextOpRequest(ops=[{"cmd": 6 + 1}]))  # MMUEXT_TLB_FLUSH_LOCAL, + 1 on the wire


class _Meter:
    """Counts messages until a count or a deadline, and what they cost."""

    def __init__(self, count: int, seconds: float):
        self.count, self.seconds, self.done = count, seconds, -WARMUP

    def start(self) -> None:
        self.threads = _threads_cpu_s()
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        self.deadline = self.wall + self.seconds

    def more(self) -> bool:
        self.done += 1
        if self.done == 0:
            self.start()
        return self.done <= 0 or (self.done < self.count if self.count else time.perf_counter() < self.deadline)

    def report(self) -> dict:
        if not self.count:
            return {"messages": self.done}
        cpu, wall, threads = time.process_time() - self.cpu, time.perf_counter() - self.wall, _threads_cpu_s()
        by_name: dict[str, float] = {}
        for (name, tid), seconds in threads.items():
            by_name[name] = by_name.get(name, 0.0) + (seconds - self.threads.get((name, tid), 0.0)) / self.done * 1e6
        return {"cpu_us": cpu / self.done * 1e6, "wall_us": wall / self.done * 1e6, "messages": self.done, "threads_cpu_us": by_name}


def stat_cpu_s(stat: str) -> float:
    """CPU seconds (user + system) that a /proc/.../stat file accounts: a process's (every
    thread, exited ones included) or one thread's. Clock ticks: meaningful over a few thousand messages."""
    with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads_cpu_s() -> dict[tuple[str, str], float]:
    """`stat_cpu_s` of each live thread of this process, by (name, tid); the main thread's
    name is `main` (Python does not name its threads in /proc)."""
    threads, main = {}, str(os.getpid())
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                threads["main" if tid == main else comm.read().strip(), tid] = stat_cpu_s(f"/proc/self/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile
            continue
    return threads


def floor(address: str, token: str, vcpu: int, meter: _Meter) -> dict:
    metadata = (("authorization", f"Bearer {token}"), ("x-xen-vcpu", str(vcpu)))
    total = (meter.count or 200_000) + WARMUP + 1
    requests = iter([hypercalls_pb2.SessionRequest(request_id=i, calls=[TLB_FLUSH_LOCAL]).SerializeToString() for i in range(1, total + 1)])
    with grpc.insecure_channel(address) as channel:
        outgoing: queue.SimpleQueue = queue.SimpleQueue()
        answers = channel.stream_stream(SESSION)(iter(outgoing.get, None), metadata=metadata)  # bytes both ways
        outgoing.put(next(requests))
        while hypercalls_pb2.SessionResponse.FromString(next(answers)).WhichOneof("push"):  # VcpuStarted comes first
            pass
        while meter.more():
            outgoing.put(next(requests))
            next(answers)
        result = meter.report()
        outgoing.put(None)
        for _ in answers:
            pass
    return result


def guest(address: str, token: str, vcpu: int, meter: _Meter) -> dict:
    from guestlib import connect

    async def main() -> dict:
        async with connect(address, token, vcpu) as client:
            await client.wait_started()
            while meter.more():
                await client.tlb_flush_local()
            return meter.report()

    return trio.run(main)


KINDS = {"floor": floor, "guest": guest}


def command(kind: str, address: str, token: str, vcpu: int, count: int = 0, seconds: float = 0) -> list[str]:
    amount = ["--seconds", str(seconds)] if seconds else [str(count)]
    return python_command("xensim.bench.client_cpu", kind, address, f"--token={token}", str(vcpu), *amount)


def main(argv: list[str]) -> None:
    kind, address, token, vcpu = argv[0], argv[1], argv[2].removeprefix("--token="), int(argv[3])
    meter = _Meter(0, float(argv[5])) if argv[4] == "--seconds" else _Meter(int(argv[4]), 0)
    print(json.dumps(KINDS[kind](address, token, vcpu, meter)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
