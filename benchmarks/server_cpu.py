"""The server's CPU per Session message, this tree against another, side by side in one run.

    python -m benchmarks.server_cpu --base DIR [--rounds 25] [--messages 3000]

Starts three servers at once: this tree's hypervisor, the hypervisor of the checkout at DIR
(e.g. `git worktree add /tmp/base main`), and the bare grpc.aio server (xensim.bench.bare_server,
answering the hypervisor's answer bytes). The same bare grpcio client as `xensim bench`'s
rpc.server_cpu_us_per_msg_over_grpc_floor (xensim.bench.client_cpu `floor`: one
MMUEXT_TLB_FLUSH_LOCAL a message, answered before the next) drives each in turn, round after
round, and each server's CPU (every thread, from /proc) over a client's run is divided by its
messages. It prints the medians, each tree over the floor, and this tree over the base, both
as the ratio of medians and as the median of the rounds' own ratios: on a loaded machine a
round's figures move together, so the paired ratio is the steadier one (read in
docs/transport.md section 7).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import grpc

from xensim.bench.client_cpu import WARMUP, command
from xensim.bench.rpc import ANSWER, process_cpu_s
from xensim.v1 import toolstack_pb2, toolstack_pb2_grpc


def _start(cwd: str, argv: list[str]) -> tuple[subprocess.Popen, str]:
    """A server started in `cwd` (whose checkout `python -m` imports) and where it listens."""
    process = subprocess.Popen([sys.executable, "-m", *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return process, json.loads(process.stdout.readline())["listen"]


def _hypervisor(cwd: str) -> tuple[subprocess.Popen, str, str]:
    process, address = _start(cwd, ["hypervisor", "serve", "--listen", "127.0.0.1:0", "--frames", str(1 << 16), "--insecure-no-admin-token"])
    with grpc.insecure_channel(address) as channel:
        created = toolstack_pb2_grpc.ToolstackStub(channel).CreateDomain(toolstack_pb2.CreateDomainRequest(nr_pages=4096, nr_vcpus=1), timeout=30)
    return process, address, created.token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a checkout of the tree to compare against")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    here = str(Path.cwd())
    servers = {"this": _hypervisor(here), "base": _hypervisor(args.base)}
    bare, address = _start(here, ["xensim.bench.bare_server", ANSWER.hex()])
    servers["floor"] = (bare, address, "unused")
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(args.rounds):
            for name, (process, address, token) in servers.items():
                before = process_cpu_s(process.pid)
                done = subprocess.run(command("floor", address, token, 0, args.messages), capture_output=True, text=True, timeout=300, check=True)
                messages = json.loads(done.stdout)["messages"] + 1 + WARMUP  # the first message, then the warm-up's
                cpu[name].append((process_cpu_s(process.pid) - before) / messages * 1e6)
    finally:
        for process, _, _ in servers.values():
            process.kill()
            process.wait()
    median = {name: statistics.median(figures) for name, figures in cpu.items()}
    paired = statistics.median(this / base for this, base in zip(cpu["this"], cpu["base"]))
    print(json.dumps({
        "server_cpu_us_per_msg": median,
        "this_over_floor": median["this"] / median["floor"],
        "base_over_floor": median["base"] / median["floor"],
        "this_over_base": median["this"] / median["base"],
        "this_over_base_paired": paired,
        "rounds": args.rounds,
        "messages": args.messages,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
