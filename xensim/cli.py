"""The `xensim` command: the user-facing programs."""

import argparse
import json
import os
import sys

from guestlib.kernel.shootdown import VARIANTS
from hypervisor.server.config import add_arguments as add_serve_arguments
from xensim.guest import add_arguments as add_guest_arguments
from xensim.timeline import add_arguments as add_timeline_arguments
from xensim.toolstack import add_arguments as add_toolstack_arguments


def _bench(args) -> int:
    from xensim.bench import run

    report = run(only=args.only)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"wrote {args.json}")
    return 0


def _replay(args) -> int:
    from hypervisor.core import audit
    from hypervisor.core.trace import replay
    from hypervisor.server.tracing import open_trace

    with open_trace(args.trace) as lines:
        report, hv = replay(lines)
    for mismatch in report.mismatches:
        print(mismatch)
    findings = audit(hv)
    digest = {None: "no digest recorded", True: "final state matches", False: "FINAL STATE DIFFERS"}[report.digest_matched]
    print(f"replayed {report.calls} calls: {len(report.mismatches)} mismatches, {digest}, {len(findings)} audit findings")
    return 0 if report.ok and not findings else 1


def _health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.server) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout).status
        except grpc.RpcError as e:
            print(f"{args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(f"{args.server}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _serve(args) -> int:
    from hypervisor.server.app import run

    return run(args, args.serve_parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and its flags (tests check docker-compose.yml's commands against it)."""
    parser = argparse.ArgumentParser(prog="xensim", description="A simulator of Xen's PV MMU, SMP and event-channel interfaces.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmarks (DESIGN.md section 6)")
    bench.add_argument("--json", metavar="FILE", help="write the report as JSON")
    bench.add_argument("--only", metavar="GROUP", help="run one group, e.g. core")
    bench.set_defaults(run=_bench)
    replay = sub.add_parser("replay", help="re-execute a hypercall trace into a fresh core and compare")
    replay.add_argument("trace", help="a trace file (JSON lines)")
    replay.set_defaults(run=_replay)
    serve = sub.add_parser("serve", help="run the hypervisor: a gRPC server playing Xen for guest vCPU processes")
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve, serve_parser=serve)
    demo = sub.add_parser("demo", help="an embedded hypervisor and a 4-vCPU guest, live, then a report")
    demo.add_argument("--seconds", type=float, default=20.0, help="how long the workload runs (default 20; per run with --race)")
    demo.add_argument("--vcpus", type=int, default=4)
    demo.add_argument("--pages", type=int, default=16384, help="guest memory in 4 KiB pages")
    demo.add_argument("--variant", choices=VARIANTS, default="modern", help="the guest's drop_mm_ref")
    demo.add_argument("--highpte", action="store_true", help="pte pages from highmem (a quarter of the guest's memory)")
    demo.add_argument("--race", action="store_true", help="run every drop_mm_ref variant and print the race table")
    demo.add_argument("--runs", type=int, default=3, help="runs per variant with --race")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--json", metavar="FILE", help="write the report as JSON")
    demo.add_argument("--trace", metavar="FILE", help="where the hypervisor writes its trace (default: a temp file)")
    demo.add_argument("--no-trace", action="store_true", help="record no trace")
    demo.set_defaults(run=_demo)
    stress = sub.add_parser("stress", help="many domains and vCPU processes against a hypervisor, with faults")
    stress.add_argument("--server", metavar="HOST:PORT", help="an existing hypervisor (default: start one)")
    stress.add_argument("--admin-token", default=os.environ.get("XENSIM_ADMIN_TOKEN"), help="the server's admin token (env XENSIM_ADMIN_TOKEN)")
    stress.add_argument("--domains", type=int, default=2)
    stress.add_argument("--vcpus", type=int, default=4, help="vCPUs per domain")
    stress.add_argument("--pages", type=int, default=8192, help="memory per domain in 4 KiB pages")
    stress.add_argument("--seconds", type=float, default=20.0)
    stress.add_argument("--seed", type=int, default=1)
    stress.add_argument("--variant", action="append", choices=VARIANTS, help="drop_mm_ref per domain, cycled (default modern)")
    stress.add_argument("--kill-vcpus", type=float, default=0.0, metavar="RATE", help="SIGKILLs per vCPU per second; killed vCPUs are restarted")
    stress.add_argument("--migrate", type=float, default=0.5, help="chance a child finishes on another vCPU")
    stress.add_argument("--json", metavar="FILE", help="write the report as JSON")
    stress.add_argument("--trace", metavar="FILE", help="record every hypercall (only when the hypervisor is started here)")
    stress.set_defaults(run=_stress)
    toolstack = sub.add_parser("toolstack", help="the admin's verbs (like xl): create domains and write their token files, destroy, audit, list")
    add_toolstack_arguments(toolstack)
    guest = sub.add_parser("guest", help="a guest replica: vCPU processes for whichever vCPUs of the token files' domains are free")
    add_guest_arguments(guest)
    health = sub.add_parser("health", help="ask a hypervisor's gRPC health service; exit status 0 when it is SERVING")
    health.add_argument("--server", required=True, metavar="HOST:PORT")
    health.add_argument("--timeout", type=float, default=5.0, metavar="S")
    health.set_defaults(run=_health)
    timeline = sub.add_parser("timeline", help="draw a trace as a per-vCPU timeline in a self-contained HTML page")
    add_timeline_arguments(timeline)
    return parser


def _demo(args) -> int:
    from xensim.demo import main as demo

    return demo(args)


def _stress(args) -> int:
    import trio

    from xensim.launch import hypervisor_server, machine_frames
    from xensim.stress import StressConfig, failed, run_stress

    config = StressConfig(args.domains, args.vcpus, args.seconds, args.seed, args.variant or ["modern"], args.kill_vcpus, args.pages, migrate=args.migrate)
    if args.server:
        report = trio.run(run_stress, args.server, args.admin_token, config)
    else:
        with hypervisor_server(*(("--trace", args.trace) if args.trace else ()), frames=machine_frames(args.domains, args.pages)) as server:
            report = trio.run(run_stress, server.address, None, config)
    summary = {k: report[k] for k in ("process_lifecycles", "audit_findings", "data_corruptions", "unexpected_errors", "leaked_frames", "unfinished_vcpus", "killed_vcpus", "restarted_vcpus")}
    print(json.dumps(summary))
    for bug in report["kernel_bugs"]:
        print(f"kernel BUG: {bug}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
