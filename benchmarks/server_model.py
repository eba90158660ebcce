"""Which server model: grpc.aio (one event loop) vs grpc's thread-pool server, measured.

    python benchmarks/server_model.py [--streams 16] [--duration 5] [--only aio|sync]

For each model it starts a server process with one domain of `--streams` vCPUs, then one
client process per vCPU; each opens that vCPU's Session stream and, from a common start time,
sends one cheap hypercall (xen_version) per message, waits for the answer, and repeats for
`--duration` seconds. It prints, per model: the median and p99 round trip over all calls, the
per-stream rates (calls/s: min / median / max, and min over median as the fairness figure),
the total rate and the server's CPU per call.

- "aio" is the real server (`python -m hypervisor serve`, hypervisor/server/app.py).
- "sync" is a throwaway written here: `grpc.server` with a ThreadPoolExecutor (two workers per
  stream: an open bidi stream pins one for its whole life, docs/transport.md section 3.1),
  the same conversion table (`convert.CALLS`) and core, and a `threading.Lock` as the
  hypervisor lock. It skips what the real server adds per message (auth lookup per stream,
  the push check, the write lock), so it flatters the thread-pool model slightly.

Clients are sync-stub bidi streams (a queue-fed request iterator), as guestlib's bridge uses.
The machine is shared and noisy: compare the two models within one run.
"""

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc

from xensim.v1 import hypercalls_pb2, hypercalls_pb2_grpc, toolstack_pb2, toolstack_pb2_grpc

CALL = hypercalls_pb2.Call(xen_version=hypercalls_pb2.XenVersionRequest())
WARMUP_S = 1.0


# -- the throwaway thread-pool server ---------------------------------------------------------


def serve_sync(nr_vcpus: int) -> None:
    from hypervisor.core import Hypervisor
    from hypervisor.server import convert

    hv = Hypervisor(nr_frames=1 << 16)
    domid = hv.toolstack("create_domain", nr_pages=1024, nr_vcpus=nr_vcpus)["domid"]
    lock = threading.Lock()

    class Clock:
        def deadline(self, relative_ns: int) -> int:
            return relative_ns  # xen_version takes no timeout

    class Servicer(hypercalls_pb2_grpc.HypercallsServicer):
        def Session(self, requests, context):
            vcpu = int(dict(context.invocation_metadata())["x-xen-vcpu"])
            for request in requests:
                response = hypercalls_pb2.SessionResponse(request_id=request.request_id)
                for i, call in enumerate(request.calls):
                    case = call.WhichOneof("call")
                    op = convert.CALLS[case]
                    args = op.args(getattr(call, case), f"calls[{i}].{case}.", Clock())
                    with lock:
                        result = hv.hypercall(domid, vcpu, op.name, **args)
                    convert.fill(op, getattr(response.results.add(), case), result, args)
                yield response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * nr_vcpus), options=[("grpc.so_reuseport", 0)])
    hypercalls_pb2_grpc.add_HypercallsServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"event": "ready", "listen": f"127.0.0.1:{port}", "token": None}), flush=True)
    server.wait_for_termination()


# -- one client process -----------------------------------------------------------------------


def run_client(address: str, token: str | None, vcpu: int, start_at: float, duration: float, out: str) -> None:
    metadata = [("x-xen-vcpu", str(vcpu))] + ([("authorization", f"Bearer {token}")] if token else [])
    channel = grpc.insecure_channel(address)
    requests: queue.SimpleQueue = queue.SimpleQueue()
    responses = hypercalls_pb2_grpc.HypercallsStub(channel).Session(iter(requests.get, None), metadata=metadata)
    latencies, request_id = [], 0
    end = start_at + duration
    while True:
        request_id += 1
        t0 = time.perf_counter()
        requests.put(hypercalls_pb2.SessionRequest(request_id=request_id, calls=[CALL]))
        response = next(responses)
        while response.request_id == 0:  # a push (VcpuStarted on vCPU 0)
            response = next(responses)
        now = time.time()
        if start_at <= now < end:
            latencies.append(time.perf_counter() - t0)
        elif now >= end:
            break
    requests.put(None)
    channel.close()
    with open(out, "w") as f:
        json.dump(latencies, f)


# -- the driver -------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_server(model: str, streams: int) -> tuple[subprocess.Popen, dict]:
    if model == "aio":
        command = [sys.executable, "-m", "hypervisor", "serve", "--insecure-no-admin-token", "--frames", str(1 << 16)]
    else:
        command = [sys.executable, __file__, "sync-server", "--streams", str(streams)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ready = json.loads(server.stdout.readline())
    if model == "aio":
        channel = grpc.insecure_channel(ready["listen"])
        created = toolstack_pb2_grpc.ToolstackStub(channel).CreateDomain(toolstack_pb2.CreateDomainRequest(nr_pages=1024, nr_vcpus=streams), timeout=10)
        channel.close()
        ready["token"] = created.token
    return server, ready


def measure(model: str, streams: int, duration: float) -> dict:
    server, ready = _start_server(model, streams)
    start_at = time.time() + WARMUP_S + 0.1 * streams
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"{v}.json") for v in range(streams)]
        clients = [
            subprocess.Popen([sys.executable, __file__, "client", ready["listen"], ready["token"] or "", str(v), str(start_at), str(duration), outs[v]])
            for v in range(streams)
        ]
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = _cpu_seconds(server.pid)
        for client in clients:
            client.wait(duration + 60)
        cpu = _cpu_seconds(server.pid) - cpu0
        per_stream = []
        for out in outs:
            with open(out) as f:
                per_stream.append(json.load(f))
    server.terminate()
    server.wait(10)
    every = sorted(x for stream in per_stream for x in stream)
    rates = sorted(len(stream) / duration for stream in per_stream)
    return {
        "model": model,
        "median_us": 1e6 * statistics.median(every),
        "p99_us": 1e6 * every[int(0.99 * (len(every) - 1))],
        "rate_min": rates[0],
        "rate_median": statistics.median(rates),
        "rate_max": rates[-1],
        "fairness": rates[0] / statistics.median(rates),
        "total_per_s": len(every) / duration,
        "server_cpu_us_per_call": 1e6 * cpu / len(every),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    sync = sub.add_parser("sync-server")
    sync.add_argument("--streams", type=int, default=16)
    client = sub.add_parser("client")
    for name in ("address", "token", "vcpu", "start_at", "duration", "out"):
        client.add_argument(name)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--only", choices=["aio", "sync"])
    args = parser.parse_args()
    if args.role == "sync-server":
        serve_sync(args.streams)
        return
    if args.role == "client":
        run_client(args.address, args.token or None, int(args.vcpu), float(args.start_at), float(args.duration), args.out)
        return
    print(f"{args.streams} vCPU streams, one xen_version per message, {args.duration:.0f} s each")
    print(f"{'model':6} {'median us':>10} {'p99 us':>8} {'min/s':>7} {'median/s':>9} {'max/s':>7} {'min/med':>8} {'total/s':>8} {'srv cpu us':>11}")
    for model in [args.only] if args.only else ["aio", "sync"]:
        r = measure(model, args.streams, args.duration)
        print(
            f"{model:6} {r['median_us']:10.0f} {r['p99_us']:8.0f} {r['rate_min']:7.0f} {r['rate_median']:9.0f} {r['rate_max']:7.0f}"
            f" {r['fairness']:8.2f} {r['total_per_s']:8.0f} {r['server_cpu_us_per_call']:11.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
