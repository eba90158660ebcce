"""Which trio-to-grpcio bridge for the vCPU's Session: CPU per message, measured.

    python -m benchmarks.guest_transport [--rounds 5] [--messages 1500] [--only NAME,...]

One hypervisor server, one domain; each client below runs in its own process as vCPU 0, opens
the Session, sends `--messages` one-hypercall messages (MMUEXT_TLB_FLUSH_LOCAL) one at a time
and reports its process CPU (all threads: `time.process_time`) and wall time per message.
Clients take turns, round after round, so the noise of a shared machine hits all alike; the
figures are medians over rounds, and the ratios to `floor-*` are what to compare.

- `floor-sync`: a bare sync-stub bidi stream, bytes in and out (no protobuf): a queue-fed
  request iterator (grpc's consumer thread) and the main thread reading answers; the floor of
  `xensim bench`'s rpc.vcpu_cpu_us_per_msg_over_grpc_floor (xensim.bench.client_cpu).
- `floor-aio`: a bare grpc.aio stream on an asyncio loop, bytes in and out.
- `bridge`: guestlib's client as it was (trio; sync stub; a reader thread handing answers to
  trio with run_sync_soon; grpc's request-consumer and channel-spin threads).
- `aio-thread`: trio; grpc.aio on an asyncio loop in one helper thread that owns the stream
  both ways (trio -> loop: call_soon_threadsafe; loop -> trio: run_sync_soon).
- `guest`: asyncio is the host loop running grpc.aio; trio runs the guest as a guest run
  (trio.lowlevel.start_guest_run) in the same thread.
- `public`: guestlib's client on its public fallback (`open_session(segregated=False)`): the
  sync-stub bridge with a reader thread.
- `current`: guestlib's client as it is now (guestlib.transport.SEGREGATED: grpcio's private
  "segregated call", one helper thread on the stream's own completion queue, trio starting each
  send itself), as `xensim bench` measures it.

Every trio client goes through guestlib's `HypercallClient`, so protobuf is paid as a guest pays.
"""

import argparse
import asyncio
import json
import math
import statistics
import subprocess
import sys
import threading
import time

import grpc
import trio

from xensim.bench import client_cpu
from xensim.v1 import hypercalls_pb2, hypercalls_pb2_grpc

CLIENTS = ("floor-sync", "floor-aio", "bridge", "aio-thread", "guest", "public", "current")
WARMUP = 100
_METHOD = "/xensim.v1.Hypercalls/Session"
_CALL = client_cpu.TLB_FLUSH_LOCAL


def _metadata(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"), ("x-xen-vcpu", "0"))


def _requests(n: int) -> list[bytes]:
    return [hypercalls_pb2.SessionRequest(request_id=i, calls=[_CALL]).SerializeToString() for i in range(1, n + 1)]


def _is_answer(raw: bytes) -> bool:
    return hypercalls_pb2.SessionResponse.FromString(raw).WhichOneof("push") is None


# -- the floors: bare grpcio, bytes only -----------------------------------------------------------


def floor_sync(address: str, token: str, n: int) -> dict:
    """xensim bench's floor (xensim.bench.client_cpu)."""
    return client_cpu.floor(address, token, 0, client_cpu._Meter(n, 0))


def floor_aio(address: str, token: str, n: int) -> dict:
    requests = _requests(WARMUP + n)

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.stream_stream(_METHOD)(metadata=_metadata(token))
            it = iter(requests)
            for _ in range(WARMUP):
                await call.write(next(it))
                while not _is_answer(await call.read()):
                    pass
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(n):
                await call.write(next(it))
                await call.read()
            result = {"cpu_us": (time.process_time() - cpu) / n * 1e6, "wall_us": (time.perf_counter() - wall) / n * 1e6}
            await call.done_writing()
            return result

    return asyncio.run(main())


# -- trio clients through guestlib's HypercallClient ----------------------------------------------


async def _hypercalls(client, n: int) -> dict:
    await client.wait_started()
    for _ in range(WARMUP):
        await client.tlb_flush_local()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await client.tlb_flush_local()
    return {"cpu_us": (time.process_time() - cpu) / n * 1e6, "wall_us": (time.perf_counter() - wall) / n * 1e6}


def current(address: str, token: str, n: int) -> dict:
    """xensim bench's vCPU client (xensim.bench.client_cpu): guestlib as it is now."""
    return client_cpu.guest(address, token, 0, client_cpu._Meter(n, 0))


class _Waiter:
    __slots__ = ("event", "response")

    def __init__(self):
        self.event = trio.Event()
        self.response = None


class _Sessionish:
    """What HypercallClient needs of a Session: exchange, upcalls, started; subclasses move
    requests out (`_put`) and call `_deliver` in trio for each answer."""

    def __init__(self):
        self._token = trio.lowlevel.current_trio_token()
        self._next = 0
        self._waiters = {}
        self._upcalls_in, self.upcalls = trio.open_memory_channel(math.inf)
        self._started_in, self.started = trio.open_memory_channel(math.inf)

    async def exchange(self, calls, stop_on_error=False):
        self._next += 1
        waiter = self._waiters[self._next] = _Waiter()
        self._put(hypercalls_pb2.SessionRequest(request_id=self._next, calls=calls, stop_on_error=stop_on_error))
        await waiter.event.wait()
        return waiter.response

    def _deliver(self, response) -> None:
        push = response.WhichOneof("push")
        if push == "started":
            self._started_in.send_nowait(response.started)
        elif push == "upcall":
            self._upcalls_in.send_nowait(response.upcall)
        else:
            waiter = self._waiters.pop(response.request_id)
            waiter.response = response
            waiter.event.set()


def _session_stub(channel):
    return hypercalls_pb2_grpc.HypercallsStub(channel)


class AioThreadSession(_Sessionish):
    """grpc.aio on an asyncio loop in one helper thread that owns the stream both ways."""

    def __init__(self, address, token):
        super().__init__()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(address, token),), daemon=True)
        self._thread.start()
        self._ready.wait()

    async def _main(self, address, token):
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        async with grpc.aio.insecure_channel(address) as channel:
            call = _session_stub(channel).Session(metadata=_metadata(token))
            self._ready.set()

            async def write():
                while (request := await self._queue.get()) is not None:
                    await call.write(request)
                await call.done_writing()

            writer = asyncio.ensure_future(write())
            async for response in call:
                self._token.run_sync_soon(self._deliver, response)
            await writer

    def _put(self, request):
        self._loop.call_soon_threadsafe(self._queue.put_nowait, request)

    def close(self):
        self._put(None)
        self._thread.join(5)


def aio_thread(address: str, token: str, n: int) -> dict:
    from guestlib.hypercalls import HypercallClient

    async def main():
        session = AioThreadSession(address, token)
        try:
            return await _hypercalls(HypercallClient(session), n)
        finally:
            session.close()

    return trio.run(main)


class GuestSession(_Sessionish):
    """grpc.aio on the host asyncio loop of this thread; trio is the guest run."""

    def __init__(self, loop, call):
        super().__init__()
        self._queue = asyncio.Queue()
        self._call = call

    async def pump(self):
        async def write():
            while (request := await self._queue.get()) is not None:
                await self._call.write(request)
            await self._call.done_writing()

        writer = asyncio.ensure_future(write())
        async for response in self._call:
            self._token.run_sync_soon(self._deliver, response)
        await writer

    def _put(self, request):
        self._queue.put_nowait(request)  # same thread: trio's guest ticks run on the host loop


def guest(address: str, token: str, n: int) -> dict:
    from guestlib.hypercalls import HypercallClient

    async def host():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        async with grpc.aio.insecure_channel(address) as channel:
            call = _session_stub(channel).Session(metadata=_metadata(token))
            holder = {}

            async def trio_main():
                session = holder["session"] = GuestSession(loop, call)
                loop.call_soon(lambda: holder.setdefault("pump", asyncio.ensure_future(session.pump())))
                try:
                    return await _hypercalls(HypercallClient(session), n)
                finally:
                    session._put(None)

            trio.lowlevel.start_guest_run(
                trio_main,
                run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                run_sync_soon_not_threadsafe=loop.call_soon,
                done_callback=lambda outcome: done.set_result(outcome),
                host_uses_signal_set_wakeup_fd=True,
            )
            result = (await done).unwrap()
            await holder["pump"]
            return result

    return asyncio.run(host())


def bridge(address: str, token: str, n: int) -> dict:
    """guestlib's bridge as of commit 113b429 (git show 113b429:guestlib/transport.py)."""
    source = subprocess.run(["git", "show", "113b429:guestlib/transport.py"], capture_output=True, text=True, check=True).stdout
    module = type(sys)("bridge_transport")
    exec(compile(source, "bridge_transport.py", "exec"), module.__dict__)
    from guestlib.hypercalls import HypercallClient

    async def main():
        async with module.open_session(address, token, 0) as session:
            return await _hypercalls(HypercallClient(session), n)

    return trio.run(main)


def public(address: str, token: str, n: int) -> dict:
    """guestlib's client on its public fallback bridge (open_session(segregated=False))."""
    from guestlib.hypercalls import HypercallClient
    from guestlib.transport import open_session

    async def main():
        async with open_session(address, token, 0, segregated=False) as session:
            return await _hypercalls(HypercallClient(session), n)

    return trio.run(main)


RUNNERS = {"public": public, "floor-sync": floor_sync, "floor-aio": floor_aio, "bridge": bridge, "aio-thread": aio_thread, "guest": guest, "current": current}


def _child(name: str, address: str, token: str, n: int) -> None:
    print(json.dumps(RUNNERS[name](address, token, n)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--only", default=",".join(CLIENTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child, args.address, args.token, args.messages)
    from xensim.launch import create_domain, hypervisor_server

    names = args.only.split(",")
    results = {name: [] for name in names}
    with hypervisor_server() as server:
        token = create_domain(server, nr_pages=4096, nr_vcpus=1, name="transport").token
        for r in range(args.rounds):
            for name in names:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.guest_transport", "--messages", str(args.messages), "--child", name, "--address", server.address, f"--token={token}"],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if out.returncode:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: " + ", ".join(f"{n} {results[n][-1]['cpu_us']:.0f}" for n in names), file=sys.stderr, flush=True)
    floors = [n for n in names if n.startswith("floor")]
    print(f"{'client':12} {'cpu us/msg':>11} {'wall us/msg':>12}  " + "  ".join(f"cpu/{f}" for f in floors))
    for name in names:
        cpu = statistics.median(r["cpu_us"] for r in results[name])
        wall = statistics.median(r["wall_us"] for r in results[name])
        ratios = "  ".join(f"{statistics.median(a['cpu_us'] / b['cpu_us'] for a, b in zip(results[name], results[f])):>{len(f) + 4}.2f}" for f in floors)
        print(f"{name:12} {cpu:11.0f} {wall:12.0f}  {ratios}")


if __name__ == "__main__":
    main()
