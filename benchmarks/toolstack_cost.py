"""The toolstack's big operations, this tree against another, measured the same way in each.

    python -m benchmarks.toolstack_cost --base DIR

`xensim bench --only scale` needs operations older trees lack (the audit of one domain, the
server's `machine_frames`), so this measures only what every tree has, by the same code run in
a child process whose imports come from the tree measured (its cwd and PYTHONPATH): on a 16 GiB
machine (2^22 frames), create, whole-machine audit and destroy of a 4 GiB domain (the core's,
CPU ms, one each), the audit of one 16 MiB domain (`audit_domain`, or the whole-machine audit
a tree without it ran for one domain; median of 3), and ListDomains over gRPC from a real
server holding 256 domains of 16 MiB (wall ms, median of 11). The trees run one after the
other, base first, so compare them only in one run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 256  # pages of 4 KiB
GIB_16 = 1 << 22  # frames


def _ms(fn, repeat: int = 1, clock=time.process_time) -> float:
    """xensim/bench/scale.py's timer, repeated here on purpose: the child runs against the
    imports of the tree measured, which may have no scale module."""
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def measure() -> dict:
    """The figures of the tree this process imports."""
    import grpc

    from hypervisor.core import Hypervisor, audit
    from xensim.v1 import toolstack_pb2, toolstack_pb2_grpc

    try:
        from hypervisor.core import audit_domain
    except ImportError:  # before per-domain audits: a domain's audit was the machine's, filtered
        audit_domain = None
    hv = Hypervisor(nr_frames=GIB_16)
    big = []
    out = {"create_ms_4gib": _ms(lambda: big.append(hv.toolstack("create_domain", nr_pages=4096 * MIB)["domid"]))}
    out["audit_ms_4gib"] = _ms(lambda: audit(hv))
    out["destroy_ms_4gib"] = _ms(lambda: hv.toolstack("destroy_domain", domid=big[0]))
    small = hv.toolstack("create_domain", nr_pages=16 * MIB)["domid"]
    out["audit_one_domain_ms_16mib_on_16gib"] = _ms((lambda: audit_domain(hv, small)) if audit_domain else (lambda: audit(hv)), 3)
    server = subprocess.Popen(
        [sys.executable, "-m", "hypervisor", "serve", "--listen", "127.0.0.1:0", "--frames", str(GIB_16), "--insecure-no-admin-token"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(json.loads(server.stdout.readline())["listen"]) as channel:
            stub = toolstack_pb2_grpc.ToolstackStub(channel)
            for _ in range(256):
                stub.CreateDomain(toolstack_pb2.CreateDomainRequest(nr_pages=16 * MIB, nr_vcpus=1), timeout=60)
            out["list_domains_ms_256_on_16gib"] = _ms(lambda: stub.ListDomains(toolstack_pb2.ListDomainsRequest(), timeout=60), 11, time.perf_counter)
    finally:
        server.kill()
        server.wait()
    return out


def _in(tree: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run([sys.executable, __file__, "--measure"], cwd=tree, env=env, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="a checkout of the tree to compare against")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure()))
        return
    if not args.base:
        parser.error("give --base DIR, a checkout to compare this tree against")
    base, this = _in(args.base), _in(str(Path(__file__).resolve().parents[1]))
    print(json.dumps({key: {"base": round(base[key], 2), "this": round(this[key], 2)} for key in this}, indent=1))


if __name__ == "__main__":
    main()
