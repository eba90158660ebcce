"""The error policy (xensim/errors.py) as a user meets it: every program, run as a process,
fails an ordinary failure in one line on stderr with the documented exit status, and no
traceback; only a bug of the simulator gets one."""

import argparse
import socket
import subprocess

import grpc
import pytest

from guestlib import CallRejected
from guestlib.kernel.shootdown import VARIANTS
from guestlib.vcpu import build_parser as build_vcpu_parser
from hypervisor.core import SimulatorBug
from xensim import launch
from xensim.cli import build_parser
from xensim.errors import EXIT_BUG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, run_program
from xensim.launch import hypervisor_server
from xensim.stress import VARIANT_HELP

CLI = ("-m", "xensim.cli")
VCPU = ("-m", "guestlib.vcpu")
SERVE = ("-m", "hypervisor", "serve")


def run(*argv: str) -> subprocess.CompletedProcess:
    return launch.run(launch.python(*argv), timeout=90)


def assert_one_line(done: subprocess.CompletedProcess, status: int, says: str) -> None:
    err = done.stderr
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert done.returncode == status and says in err, (done.returncode, err)


@pytest.fixture(scope="module")
def refused_port():
    """A loopback port nobody listens on (bound, not listening: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    with hypervisor_server(admin_token="the-right-token") as running:
        yield running


def test_usage_errors_are_one_line_with_status_2(tmp_path):
    cases = [
        ((*CLI, "demo", "--vcpus", "0"), "--vcpus: 0 is too small: at least 1"),
        ((*CLI, "demo", "--seconds", "-1"), "--seconds: -1 is too small"),
        ((*CLI, "demo", "--pages", "100"), "--pages: 100 is too small: at least 1024"),
        ((*CLI, "demo", "--vcpus", "four"), "'four' is not an integer"),
        ((*CLI, "stress", "--migrate", "2"), "not a chance between 0 and 1"),
        ((*CLI, "demo", "--json", str(tmp_path / "no" / "such" / "dir.json")), "does not exist"),
        ((*CLI, "stress", "--json", str(tmp_path)), "is a directory"),
        ((*CLI, "health", "--server", "nonsense"), "'nonsense' is not HOST:PORT"),
        ((*CLI, "toolstack", "list", "--server", "host:99999"), "is not HOST:PORT"),
        ((*CLI, "bench", "--only", "nope"), "invalid choice: 'nope'"),
        ((*CLI, "demo", "--variant", "nope"), "invalid choice: 'nope'"),
        ((*CLI, "guest", "--tokens", str(tmp_path)), "no token files in"),
        ((*CLI, "serve", "--listen", "nonsense"), "expected HOST:PORT"),
        ((*CLI, "timeline", str(tmp_path / "t.jsonl")), "the following arguments are required: --html"),
        ((*VCPU, "--server", "127.0.0.1:1", "--token=a", "--vcpu", "-1"), "--vcpu: -1 is too small"),
        ((*SERVE, "--frames", "0"), "--frames must be positive"),
    ]
    for argv, says in cases:
        assert_one_line(run(*argv), EXIT_USAGE, says)


def test_a_missing_or_non_trace_file_is_one_line_with_status_2(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    for program in (("replay",), ("timeline", "--html", str(tmp_path / "t.html"))):
        assert_one_line(run(*CLI, program[0], str(tmp_path / "nowhere.jsonl"), *program[1:]), EXIT_USAGE, "No such file or directory")
        assert_one_line(run(*CLI, program[0], str(text), *program[1:]), EXIT_USAGE, f"{text}: line 1")


def test_a_hypervisor_that_is_not_running_is_one_line_with_status_1(refused_port):
    address = f"127.0.0.1:{refused_port}"
    for argv in (
        (*CLI, "stress", "--server", address, "--seconds", "1"),
        (*CLI, "toolstack", "list", "--server", address),
        (*CLI, "health", "--server", address, "--timeout", "2"),
    ):
        assert_one_line(run(*argv), EXIT_FAILED, "cannot reach the hypervisor")
    assert_one_line(run(*VCPU, "--server", address, "--token=t", "--vcpu", "0"), EXIT_FAILED, "is the hypervisor running at that address")


def test_a_refused_token_is_one_line_with_status_1(server):
    for argv in (
        (*CLI, "toolstack", "list", "--server", server.address, "--admin-token", "wrong"),
        (*CLI, "stress", "--server", server.address, "--admin-token", "wrong", "--seconds", "1"),
    ):
        assert_one_line(run(*argv), EXIT_FAILED, "the hypervisor refused the token (wrong admin token)")
    assert_one_line(run(*VCPU, "--server", server.address, "--token=wrong", "--vcpu", "0"), EXIT_FAILED, "is the token this domain's")


def test_an_errno_from_the_hypervisor_is_one_line_with_status_1(server):
    done = run(*CLI, "toolstack", "destroy", "--server", server.address, "--admin-token", server.admin_token, "4242")
    assert_one_line(done, EXIT_FAILED, "the hypervisor refused: ESRCH")


def test_a_port_in_use_or_an_address_not_of_this_machine_is_one_line_with_status_1(server):
    for serve in ((*CLI, "serve"), SERVE):
        assert_one_line(run(*serve, "--listen", server.address), EXIT_FAILED, "Address already in use; is another server using it?")
        assert_one_line(run(*serve, "--listen", "no-such-host.invalid:50051"), EXIT_FAILED, "cannot listen on no-such-host.invalid:50051")
        assert_one_line(run(*serve, "--listen", "192.0.2.1:50051"), EXIT_FAILED, "Cannot assign requested address")


def test_a_bare_xensim_prints_the_commands_and_version_says_which():
    bare = run(*CLI)
    assert bare.returncode == EXIT_USAGE and bare.stdout == ""
    for command in ("demo", "stress", "replay", "timeline", "serve", "toolstack", "guest", "health", "bench"):
        assert f"\n    {command}" in bare.stderr
    version = run(*CLI, "--version")
    assert version.returncode == 0 and version.stdout.startswith("xensim ")


def test_a_bug_of_the_simulator_alone_gets_a_traceback(capsys):
    def broken() -> int:
        raise SimulatorBug("frame 0x42 freed with 1 type reference left")

    assert run_program("xensim demo", broken) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "frame 0x42 freed" in err
    assert err.splitlines()[-1].startswith("xensim demo: this is a bug of the simulator")


def test_a_failure_inside_a_trio_nursery_is_explained_like_any_other(capsys):
    def nursery_failure() -> int:
        raise ExceptionGroup("nursery", [FileNotFoundError(2, "No such file or directory", "/nowhere")])

    assert run_program("xensim demo", nursery_failure) == EXIT_FAILED
    assert capsys.readouterr().err == "xensim demo: /nowhere: No such file or directory\n"

    def interrupted() -> int:
        raise BaseExceptionGroup("nursery", [KeyboardInterrupt()])

    assert run_program("xensim demo", interrupted) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "xensim demo: interrupted\n"


def _parsers(parser: argparse.ArgumentParser, name: str):
    """This parser and every subcommand's, with their names."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {choice.dest for choice in action._choices_actions}
            seen = set()
            for sub, subparser in action.choices.items():
                if id(subparser) in seen:  # an alias (who-maps for lookup-pte): described as its command
                    continue
                seen.add(id(subparser))
                assert sub in described, f"{name} {sub} has no one-line description"
                yield from _parsers(subparser, f"{name} {sub}")


def test_every_option_says_what_it_is_for_and_its_default():
    for name, parser in [*_parsers(build_parser(), "xensim"), ("python -m guestlib.vcpu", build_vcpu_parser())]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction | argparse._VersionAction):
                continue
            assert action.help, f"{name} {action.dest} has no help"
        shown = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in (action.help or "") or f"(default: {action.default})" in " ".join(shown.split()), f"{name} {action.dest}"


def test_every_drop_mm_ref_variant_is_described_in_help():
    assert set(VARIANT_HELP) == set(VARIANTS)
    for program in ("demo", "stress"):
        shown = run(*CLI, program, "--help").stdout.splitlines()
        for variant, description in VARIANT_HELP.items():
            assert f"  {variant:<12} {description}" in shown


def test_the_health_check_loads_neither_the_guest_kernel_nor_the_hypervisor():
    """A container's health check runs every two seconds: it imports gRPC's health client and
    the CLI's parser, not guestlib, numpy, trio or rich (which took it from ~0.4 s to ~0.8 s)."""
    probe = "import sys; from xensim.cli import main; main(sys.argv[1:]); print(sorted({m.split('.')[0] for m in sys.modules} & {'guestlib', 'hypervisor', 'numpy', 'trio', 'rich'}))"
    done = run("-c", probe, "health", "--server", "127.0.0.1:1", "--timeout", "0.1")
    assert done.stdout == "[]\n", done.stdout + done.stderr


def test_a_bug_of_the_simulator_inside_the_hypervisor_is_said_so_without_a_client_traceback(capsys):
    """The server's traceback is in its log; the client says whose bug it is and exits 70."""

    def internal() -> int:
        raise CallRejected(grpc.StatusCode.INTERNAL, "internal error (a bug of the simulator, see the server log)")

    assert run_program("xensim toolstack", internal) == EXIT_BUG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "the hypervisor hit a bug of the simulator" in err
