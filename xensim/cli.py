"""The `xensim` command: the user-facing programs."""

import argparse
import json
import sys

from hypervisor.server.config import add_arguments as add_serve_arguments


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

    with open(args.trace) as lines:
        report, hv = replay(lines)
    for mismatch in report.mismatches:
        print(mismatch)
    findings = audit(hv)
    digest = {None: "no digest recorded", True: "final state matches", False: "FINAL STATE DIFFERS"}[report.digest_matched]
    print(f"replayed {report.calls} calls: {len(report.mismatches)} mismatches, {digest}, {len(findings)} audit findings")
    return 0 if report.ok and not findings else 1


def _serve(args) -> int:
    from hypervisor.server.app import run

    return run(args, args.serve_parser)


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
