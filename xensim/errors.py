"""How every program fails: one line on stderr that says what went wrong and what to do, and a
documented exit status (README, "Exit status"). Only a bug of the simulator gets a traceback.

One mechanism for all of them (`xensim ...`, `python -m hypervisor serve`, `python -m
guestlib.vcpu`): their parsers are `Parser` (a usage error is one line, exit status 2; range
checks are the `type=` validators below), and their bodies run under `run_program`, which
turns the ordinary failures (a missing file, a hypervisor that is not there, a refused token,
an errno from the hypervisor...) into that one line. This module imports nothing heavy: an
exception class is only looked up in `sys.modules`, since an exception of a module that was
never imported cannot have been raised.
"""

import argparse
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed: a verdict, or an ordinary failure explained on stderr
EXIT_USAGE = 2  # the command line is wrong (or replay's input is not a trace)
EXIT_BUG = 70  # a bug of the simulator (sysexits.h EX_SOFTWARE): traceback on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_TERMINATED = 143  # SIGTERM, where a program stops its processes first (128 + SIGTERM)
# What ends the Session of a vCPU whose process a controlled run's step kills (ABORTED; its
# process then SIGKILLs itself, as `stress --kill-vcpus` kills one in a free run: docs/schedule.md section 10).
KILLED_BY_SCHEDULE = "killed by the schedule"


class UserError(Exception):
    """An ordinary failure; its message says what went wrong and what to do."""

    status = EXIT_FAILED


class UsageError(UserError):
    """A command line that cannot run as given (what argparse alone cannot check)."""

    status = EXIT_USAGE


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default, except where there is none (None, a flag's False) or
    its help already says it; a description or epilog keeps its lines (one per item)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2) and defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def at_least(low: float, kind: type = int, high: float | None = None) -> Callable[[str], float]:
    """A `type=` for a number of `kind` no smaller than `low` (and, given, no larger than `high`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is too small: at least {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is too large: at most {high}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def address_sizes(text: str) -> list[int]:
    """A `type=` for a comma-separated list of guest address sizes: 64 (x86-64) or 32 (PAE)."""
    sizes = [size.strip() for size in text.split(",")]
    if not all(size in ("32", "64") for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of address sizes such as 64, 32 or 32,64")
    return [int(size) for size in sizes]


def fraction(text: str) -> float:
    """A `type=` for a chance, 0..1."""
    value = at_least(0.0, float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is not a chance between 0 and 1")
    return value


def address(text: str) -> str:
    """A `type=` for a hypervisor's HOST:PORT (the host is looked up when connecting)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdecimal() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:50051 ([::1]:50051 for IPv6)")
    return text


def writable_file(text: str) -> str:
    """A `type=` for an output file, checked before the run rather than after it."""
    directory = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory: name a file")
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"cannot write {text}: directory {directory} does not exist")
    if not os.access(text if os.path.exists(text) else directory, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    return text


def check_listen(host: str, port: int) -> None:
    """Fail now, in one line, where the server's bind would fail (a name that does not
    resolve, an address not of this machine, a port in use), before gRPC logs its own lines."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; give an address of this machine, e.g. --listen 127.0.0.1:50051") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
        try:
            probe.bind(where)
        except OSError as e:
            hint = "is another server using it? pick another with --listen HOST:PORT (port 0: any free one)" if e.errno == 98 else "give an address of this machine"
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None


@contextmanager
def reading(path: str) -> Iterator[None]:
    """A file that cannot be read as the input it should be (missing, unreadable, not a trace):
    one line naming it, exit status 2."""
    from hypervisor.core.trace import TraceError

    try:
        yield
    except (OSError, TraceError) as e:
        raise UsageError(f"{path}: {getattr(e, 'strerror', None) or e}") from None


def _class(module: str, name: str) -> type | tuple:
    """The exception class, if its module was imported (else nothing can be one of it)."""
    return getattr(sys.modules.get(module), name, ())


def _rpc(code: str, details: str) -> tuple[str, int]:
    """A refused or failed gRPC call, in the user's terms."""
    if code == "UNAVAILABLE":
        return f"cannot reach the hypervisor ({details}); is `xensim serve` running at that address?", EXIT_FAILED
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return f"the hypervisor refused the token ({details}); give the right one (--admin-token or $XENSIM_ADMIN_TOKEN; a guest's is in its token file)", EXIT_FAILED
    if code == "DEADLINE_EXCEEDED":
        return f"the hypervisor did not answer in time ({details}); is it overloaded or stopped?", EXIT_FAILED
    if code == "INTERNAL":  # the server's traceback is in its log
        return f"the hypervisor hit a bug of the simulator ({details}); its log has the traceback: please report it", EXIT_BUG
    return f"the hypervisor refused the call: {code}: {details}", EXIT_FAILED


def explain(e: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit status of an ordinary failure, or None for a bug of the
    simulator (a SimulatorBug, or any exception no rule here expects)."""
    if isinstance(e, UserError):
        return str(e), e.status
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror}", EXIT_FAILED
    if isinstance(e, _class("guestlib.hypercalls", "CallRejected")):
        return _rpc(e.code.name, e.message)
    if isinstance(e, _class("grpc", "RpcError")) and hasattr(e, "code"):
        return _rpc(e.code().name, e.details())
    if isinstance(e, _class("guestlib.hypercalls", "XenError")) or isinstance(e, _class("hypervisor.core.errors", "XenError")):
        return f"the hypervisor refused: {e}", EXIT_FAILED
    if isinstance(e, _class("guestlib.transport", "SessionClosed")):
        return f"{e}; is the hypervisor running at that address, and is the token this domain's?", EXIT_FAILED
    return None


def _leaves(e: BaseException) -> list[BaseException]:
    """The exceptions inside trio's (nested) exception groups."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for inner in e.exceptions for leaf in _leaves(inner)]
    return [e]


def run_program(prog: str, body: Callable[[], int]) -> int:
    """Run a program's body under the policy: its status, or the failure's one line and status."""
    try:
        return body()
    except SystemExit:
        raise
    except BaseException as e:  # every exception is either explained or a bug
        leaves = _leaves(e)
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        explained = [explain(leaf) for leaf in leaves if not isinstance(leaf, KeyboardInterrupt)]
        if all(explained):
            message, status = explained[0]
            print(f"{prog}: {message}", file=sys.stderr)
            return status
        traceback.print_exception(e)
        print(f"{prog}: this is a bug of the simulator, not of your input or set-up; please report it with the traceback above", file=sys.stderr)
        return EXIT_BUG
