"""The `xensim` command: the user-facing programs, under one error policy (xensim/errors.py)."""

import argparse
import importlib
import json
import sys

from xensim.errors import EXIT_USAGE, Parser, address, at_least, reading, run_program, writable_file

# Each subcommand: its one line, and where its arguments are defined ("module:function"). Only
# the one being run is imported, so that `xensim health` (a container's health check, every
# two seconds) loads no more than it needs: not the guest kernel, numpy or the hypervisor.
COMMANDS = {
    "demo": ("an embedded hypervisor and a 4-vCPU guest, live, then a report", "xensim.demo:add_arguments"),
    "stress": ("many domains and vCPU processes against a hypervisor, with faults", "xensim.stress:add_arguments"),
    "hunt": ("seeded controlled runs of the lazy-TLB unpin race until one fails, and the command that reproduces it", "xensim.hunt:add_arguments"),
    "replay": ("re-execute a hypercall trace, or the prefix a file holds, and compare (exit status 2: not a trace)", "xensim.cli:_add_replay_arguments"),
    "timeline": ("draw a trace as a per-vCPU timeline in a self-contained HTML page", "xensim.timeline:add_arguments"),
    "serve": ("run the hypervisor: a gRPC server playing Xen for guest vCPU processes", "xensim.cli:_add_serve_arguments"),
    "toolstack": ("the admin's verbs (like xl): create domains and write their token files, destroy, audit, list", "xensim.toolstack:add_arguments"),
    "guest": ("a guest replica: vCPU processes for whichever vCPUs of the token files' domains are free", "xensim.guest:add_arguments"),
    "health": ("ask a hypervisor's gRPC health service; exit status 0 when it is SERVING", "xensim.cli:_add_health_arguments"),
    "bench": ("run the benchmarks and write their figures as JSON", "xensim.cli:_add_bench_arguments"),
    "trace": ("work with a hypercall trace: export it for Perfetto / chrome://tracing, explain its failures", "xensim.trace_export:add_arguments"),
    "xl": ("xl, lsevtchn, xen-mfndump, debug-keys, xentop over a running hypervisor, plus who-maps and pagetable pictures", "xensim.xl:add_arguments"),
}


def _bench(args) -> int:
    from xensim.bench import run

    report = run(only=args.only)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"wrote {args.json}")
    return 0


def _add_bench_arguments(parser: Parser) -> None:
    from xensim.bench import GROUPS

    parser.add_argument("--json", metavar="FILE", type=writable_file, help="write the report as JSON")
    parser.add_argument("--only", metavar="GROUP", choices=GROUPS, help=f"run one group: {', '.join(GROUPS)}")
    parser.set_defaults(run=_bench)


def _replay(args) -> int:
    """Exit status 0: every call (of the whole trace or of the prefix the file holds) gave its
    recorded outcome, the final state matched where the trace has its end record, and audit is
    clean; 1: some did not; 2: the file is not a trace."""
    from hypervisor.core import audit
    from hypervisor.core.trace import replay
    from hypervisor.server.tracing import open_trace

    with reading(args.trace), open_trace(args.trace) as stream:
        report, hv = replay(stream)
    for mismatch in report.mismatches:
        print(mismatch)
    if report.cut_line is not None:
        print(f"record {report.cut_line} is cut short (its writer stopped mid-record): skipped")
    findings = audit(hv)
    start = " from a snapshot of the running machine" if report.snapshot else ""
    state = {True: "final state matches, ", False: "FINAL STATE DIFFERS, ", None: ""}[report.digest_matched]
    prefix = "; the trace ends without its end record: replayed as a prefix, final state not compared" if report.digest_matched is None else ""
    print(f"replayed {report.calls} calls{start}: {len(report.mismatches)} mismatches, {state}{len(findings)} audit findings{prefix}")
    return 0 if report.ok and not findings else 1


def _add_replay_arguments(parser: Parser) -> None:
    parser.add_argument("trace", help="a trace file (`xensim serve --trace FILE` or Toolstack StartTrace; .gz compressed)")
    parser.set_defaults(run=_replay)


def _health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.server) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout).status
    print(f"{args.server}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _add_health_arguments(parser: Parser) -> None:
    parser.add_argument("--server", required=True, metavar="HOST:PORT", type=address, help="the hypervisor")
    parser.add_argument("--timeout", type=at_least(0.001, float), default=5.0, metavar="S", help="how long to wait for the answer")
    parser.set_defaults(run=_health)


def _add_serve_arguments(parser: Parser) -> None:
    from hypervisor.server.config import add_arguments

    add_arguments(parser)
    parser.set_defaults(run=_serve, serve_parser=parser)


def _serve(args) -> int:
    from hypervisor.server.app import run

    return run(args, args.serve_parser)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 the run failed (a verdict, or a failure said in one line on
    stderr), 2 usage, 70 a bug of the simulator (with a traceback), 130 interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=next((arg for arg in argv if not arg.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `xensim`: what there is to run
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run_program(f"xensim {args.command}", lambda: args.run(args))


class _Version(argparse.Action):
    """--version, which looks the installed version up only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the installed version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("xensim")
        except PackageNotFoundError:  # run from a checkout without installing
            installed = "(not installed)"
        print(f"xensim {installed}")
        parser.exit()


def build_parser(only: str | None = None) -> Parser:
    """Every subcommand, and the flags of `only` (of all by default: tests check
    docker-compose.yml's commands against them)."""
    parser = Parser(prog="xensim", description="A simulator of Xen's PV MMU, SMP and event-channel interfaces. `xensim demo` is the place to start.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, where) in COMMANDS.items():
        subparser = sub.add_parser(name, help=summary)
        if only in (None, name) or only not in COMMANDS:
            module, function = where.split(":")
            getattr(importlib.import_module(module), function)(subparser)
    return parser


if __name__ == "__main__":
    sys.exit(main())
