"""The one launcher (xensim/launch.py): a program killed from outside leaves no process behind,
and no module starts a project process any other way."""

import ast
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.processes import alive, children
from xensim.launch import SETPRIV, started, xensim_command

ROOT = Path(__file__).resolve().parents[1]
SPAWNS = {
    "subprocess.Popen", "subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
    "trio.run_process", "trio.lowlevel.open_process", "os.fork", "os.system", "os.posix_spawn", "os.execv", "os.execvp",
}  # fmt: skip
# Files that start processes which are not the project's, or not on this interpreter: how many
# places in each (a new one there must be looked at too), and why they may.
ALLOWED = {
    "xensim/launch.py": (2, "the launcher itself"),
    "tests/test_setup.py": (7, "git, and the README's set-up and programs in a clean clone with the system python3, as a user runs them"),
    "tests/test_style.py": (2, "ruff"),
    "tests/test_timeline.py": (1, "chromium"),
    "tests/server/test_grpcurl.py": (1, "grpcurl"),
    "tests/server/test_trace.py": (2, "mount and umount of a small tmpfs"),
    "tests/server/test_serve.py": (1, "openssl, for a test certificate"),
    "tests/contract/test_proto_staleness.py": (2, "scripts/gen_proto.py, the build step that regenerates xensim/v1"),
    "tests/contract/test_citations.py": (1, "git ls-files, the files a clone has"),
}


def _name(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain, else ''."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}" if _name(node.value) else ""
    return node.id if isinstance(node, ast.Name) else ""


def spawns(path: Path) -> list[str]:
    """Where the module starts a process, or builds a command on this interpreter itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and _name(node.func) in SPAWNS:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {_name(node.func)}")
        elif isinstance(node, ast.Attribute) and _name(node) == "sys.executable":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: sys.executable")
        elif isinstance(node, ast.ImportFrom) and node.module in ("subprocess", "trio") and {a.name for a in node.names} & {"Popen", "run", "run_process"}:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import ...")
    return found


def test_no_project_process_is_started_outside_the_launcher():
    modules = [p for folder in ("xensim", "tests") for p in sorted((ROOT / folder).rglob("*.py"))]
    outside = [where for p in modules if str(p.relative_to(ROOT)) not in ALLOWED for where in spawns(p)]
    assert not outside, "start project processes through xensim/launch.py (or add the file to ALLOWED with a reason):\n" + "\n".join(outside)
    changed = {name: spawns(ROOT / name) for name, (count, _) in ALLOWED.items() if len(spawns(ROOT / name)) != count}
    assert not changed, f"the places of ALLOWED files changed; is each new one a process of the project? {changed}"


@pytest.mark.timeout(180)
@pytest.mark.skipif(not SETPRIV, reason="no setpriv (util-linux) to set the parent-death signal")
@pytest.mark.parametrize(
    "signum, args",
    [(signal.SIGTERM, ("--scenario", "stale-cr3")), (signal.SIGKILL, ("--seconds", "120"))],
    ids=["SIGTERM to a scenario", "SIGKILL mid-run"],
)
def test_a_demo_killed_from_outside_leaves_no_process_behind(signum, args):
    """A signal the demo does not handle, once its hypervisor and both vCPU processes run:
    SIGTERM to a scripted scenario (it dies at once), SIGKILL to a run. Its hypervisor and vCPU
    processes, in sessions of their own, get their parent-death signal and end too (the
    hypervisor used to go on serving, orphaned)."""
    with started(xensim_command("demo", "--vcpus", "2", "--no-trace", *args)) as demo:
        deadline = time.monotonic() + 120
        while len(spawned := children(demo.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(spawned) == 3, demo.log()
        demo.process.send_signal(signum)
        assert demo.process.wait(30) == -signum
    deadline = time.monotonic() + 20
    while (left := [pid for pid in spawned if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # not to leave them running past a failure
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the demo's tree still running: {left}"
