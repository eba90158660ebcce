"""The `serve` command's arguments, defined once for `python -m hypervisor serve` and
`xensim serve`, and checked into a `Config`. Imports no gRPC, so the CLI starts quickly."""

import argparse
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass

from hypervisor.core.abi import MAX_VCPUS
from hypervisor.core.hypervisor import DEFAULT_FRAMES, MAX_DOMAINS
from hypervisor.core.policy import DEFAULT_PCT_STEPS, ScheduleSpec, parse_schedule

SILENCE_S = 20.0  # see --schedule-silence (docs/schedule.md section 5)

ADMIN_TOKEN_ENV = "XENSIM_ADMIN_TOKEN"
# A number as str() writes it, for text from outside (a port, the x-xen-vcpu metadata): ASCII
# digits, few enough for int(), which reads any Unicode digit ('\u0663' as 3) and raises
# ValueError past 4300 digits.
DECIMAL_NUMBER = re.compile(r"[0-9]{1,9}")
GRPC_INT_MAX = (1 << 31) - 1  # grpc's integer options are C ints (milliseconds for times)


@dataclass(frozen=True)
class Connections:
    """What one client, or many, may hold of the server (README's Limits table). Without
    them, 1,124 connections that only finished the HTTP/2 handshake used up the server's file
    descriptors and kept them, and a client whose network path vanished kept its vCPU's
    Session, so no other process could claim the vCPU."""

    max_connections: int = MAX_DOMAINS * MAX_VCPUS  # a process for every vCPU the machine runs
    max_streams: int = 2 * MAX_VCPUS  # a process running a whole domain: a Session and a unary call per vCPU
    max_calls: int = 2 * MAX_DOMAINS * MAX_VCPUS  # the same for every vCPU of the machine
    idle_timeout_s: float = 30.0
    keepalive_s: float = 20.0
    keepalive_timeout_s: float = 10.0


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    frames: int
    admin_token: str | None  # None: Toolstack calls need no token (loopback only)
    tls: tuple[bytes, bytes] | None  # (key, certificate chain), PEM
    trace: str | None
    grace_s: float
    connections: Connections = Connections()
    log_level: str = "INFO"
    metrics_port: int | None = None  # serve Prometheus metrics on this port of the listen host
    log_interval_s: float = 10.0  # how often refused hypercalls are summed up in the log
    schedule: ScheduleSpec = ScheduleSpec()  # docs/schedule.md
    schedule_file: str | None = None  # where a controlled run's chosen steps are written at exit
    pct_steps: int = DEFAULT_PCT_STEPS  # PCT's k: the run's expected length in steps
    recorded: dict | None = None  # replay:FILE's schedule file
    silence_s: float = SILENCE_S  # a controlled run sets aside a vCPU silent this long
    kill_rate: float = 0.0  # a controlled run's step kills the vCPU chosen at this rate (docs/schedule.md section 10)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT", help="where to listen (port 0: pick a free one; default %(default)s)")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, metavar="N", help="machine memory in 4 KiB frames (default %(default)s)")
    parser.add_argument("--admin-token", metavar="TOKEN", help=f"the Toolstack's bearer token (default: ${ADMIN_TOKEN_ENV}, else a generated one, shown in the ready line)")
    parser.add_argument("--insecure-no-admin-token", action="store_true", help="let any caller use the Toolstack (only when listening on loopback)")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain (needs --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--trace", metavar="FILE", help="record every call from the start (as Toolstack StartTrace)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="what goes to stderr: debug, info (domains, Sessions, refused calls; the default), warning, error")
    parser.add_argument("--log-interval", type=float, default=10.0, metavar="S", help="sum up refused hypercalls in one log line every S seconds (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics over HTTP on this port of the listen host (0: a free one, logged)")
    parser.add_argument(
        "--schedule",
        default="free",
        metavar="free|random:SEED|pct:SEED[:DEPTH]|replay:FILE",
        help="who runs next: free (whatever arrives first; the default), or a controlled run whose seed names one interleaving, on virtual time (docs/schedule.md)",
    )
    parser.add_argument("--schedule-file", metavar="FILE", help="with a controlled --schedule, write the steps chosen to FILE at exit (for --schedule replay:FILE)")
    parser.add_argument("--schedule-steps", type=int, default=DEFAULT_PCT_STEPS, metavar="N", help="the run's expected length in steps, where pct places its change points (default %(default)s)")
    parser.add_argument(
        "--schedule-silence", type=float, default=SILENCE_S, metavar="S", help="a controlled run sets aside a vCPU that sends nothing for S seconds while it is waited for (default %(default)s)"
    )
    parser.add_argument(
        "--schedule-kills",
        type=float,
        default=0.0,
        metavar="RATE",
        help="with --schedule random or pct, a step kills the vCPU chosen instead of running it, RATE times per vCPU per second of Xen time (docs/schedule.md section 10)",
    )
    parser.add_argument("--grace", type=float, default=3.0, metavar="S", help="on SIGINT/SIGTERM, how long running calls get to finish (default %(default)s)")
    limits = parser.add_argument_group("connection limits (README, Limits)")
    default = Connections()
    limits.add_argument(
        "--max-connections",
        type=int,
        default=default.max_connections,
        metavar="N",
        help="connections held at once; more are closed as they arrive (default %(default)s, and no more than the open-file limit allows)",
    )
    limits.add_argument("--max-streams", type=int, default=default.max_streams, metavar="N", help="calls and streams at once on one connection; more wait in the client (default %(default)s)")
    limits.add_argument("--max-calls", type=int, default=default.max_calls, metavar="N", help="calls and streams at once on the whole server; more fail with RESOURCE_EXHAUSTED (default %(default)s)")
    limits.add_argument(
        "--idle-timeout",
        type=float,
        default=default.idle_timeout_s,
        metavar="S",
        help="close a connection that carries no call for S seconds, or has not finished its handshake in S (default %(default)s)",
    )
    limits.add_argument("--keepalive", type=float, default=default.keepalive_s, metavar="S", help="ping each connection every S seconds (default %(default)s)")
    limits.add_argument(
        "--keepalive-timeout",
        type=float,
        default=default.keepalive_timeout_s,
        metavar="S",
        help="close a connection whose ping gets no answer in S seconds, ending its calls and Sessions (default %(default)s)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """Check the arguments; `parser.error` (exit status 2) explains any that do not fit."""
    host, sep, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not DECIMAL_NUMBER.fullmatch(port) or int(port) > 65535:
        parser.error(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:50051 ([::1]:0 for IPv6)")
    if args.frames <= 0:
        parser.error("--frames must be positive")
    if args.insecure_no_admin_token:
        if args.admin_token:
            parser.error("--admin-token and --insecure-no-admin-token contradict each other")
        if not _is_loopback(host):
            parser.error(f"--insecure-no-admin-token is refused on {host}: anyone who can reach it could destroy domains; listen on 127.0.0.1 or give an admin token")
        admin_token = None
    else:
        admin_token = args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or secrets.token_urlsafe(24)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert:
        try:
            with open(args.tls_key, "rb") as key, open(args.tls_cert, "rb") as cert:
                tls = (key.read(), cert.read())
        except OSError as e:
            parser.error(f"cannot read {e.filename}: {e.strerror}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port {args.metrics_port}: expected 0 to 65535")
    if args.log_interval <= 0:
        parser.error("--log-interval must be positive")
    connections = _connections(args, parser)
    schedule, recorded = _schedule(args, parser)
    return Config(
        host, int(port), args.frames, admin_token, tls, args.trace, args.grace, connections, args.log_level.upper(), args.metrics_port, args.log_interval,
        schedule, args.schedule_file, args.schedule_steps, recorded, args.schedule_silence, args.schedule_kills,
    )  # fmt: skip


def _schedule(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[ScheduleSpec, dict | None]:
    from .schedule import check_kills, load_record

    try:
        schedule = parse_schedule(args.schedule)
        recorded = load_record(schedule.file) if schedule.mode == "replay" else None
    except ValueError as e:
        parser.error(str(e))
    if args.schedule_file and not schedule.controlled:
        parser.error("--schedule-file records a controlled run: give --schedule random:SEED, pct:SEED or replay:FILE")
    if args.schedule_steps < 2:
        parser.error("--schedule-steps must be at least 2")
    if args.schedule_silence <= 0:
        parser.error("--schedule-silence must be positive")
    if not args.schedule_kills >= 0 or (args.schedule_kills and not schedule.controlled):
        parser.error("--schedule-kills is a rate, 0 or more, of a controlled run: give --schedule random:SEED or pct:SEED too")
    if recorded is not None:
        try:
            check_kills(recorded, schedule.file, args.schedule_kills, "--schedule-kills")
        except ValueError as e:
            parser.error(str(e))
    return schedule, recorded


def _connections(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Connections:
    counts = {"max_connections": args.max_connections, "max_streams": args.max_streams, "max_calls": args.max_calls}
    times = {"idle_timeout_s": args.idle_timeout, "keepalive_s": args.keepalive, "keepalive_timeout_s": args.keepalive_timeout}
    for name, value in counts.items():
        if not 0 < value <= GRPC_INT_MAX:
            parser.error(f"--{name.replace('_', '-')} must be 1 to {GRPC_INT_MAX}")
    for name, value in times.items():
        if not 0.001 <= value <= GRPC_INT_MAX / 1000:
            parser.error(f"--{name.removesuffix('_s').replace('_', '-')} must be 0.001 to {GRPC_INT_MAX // 1000} seconds")
    return Connections(**counts, **times)
