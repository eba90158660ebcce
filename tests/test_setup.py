"""The README's two commands, as a newcomer runs them: in a clean clone, with the machine's own
python3 and no virtual environment but the one the command makes."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_DEMO = " && .venv/bin/xensim demo"


def readme_commands() -> list[str]:
    """The lines of the README's first code block."""
    block = re.search(r"```\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return block.group(1).splitlines()


def system_python() -> str:
    """The machine's python3, not this test run's virtual environment's: /usr/bin/python3
    where it is recent enough, else the interpreter the running venv was made from."""
    for candidate in ("/usr/bin/python3", sys._base_executable):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info >= (3, 11) and sys.prefix == sys.base_prefix)"], capture_output=True, text=True)
        if probe.stdout.strip() == "True":
            return candidate
    pytest.fail("no system python3 of 3.11 or later (the README's commands need one)")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == readme_commands()[1]


@pytest.mark.timeout(1200)  # a fresh virtual environment installs every dependency
def test_the_readme_set_up_works_in_a_clean_clone_with_the_system_python(tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: nothing to clone")
    first = readme_commands()[0]
    assert first.endswith(RUN_DEMO), first
    clone, bin_dir = tmp_path / "xensim", tmp_path / "bin"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(clone)], check=True, timeout=120)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", head], check=True, timeout=120)
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(system_python())
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    started = time.monotonic()
    set_up = subprocess.run(["bash", "-c", first.removesuffix(RUN_DEMO)], cwd=clone, env=env, capture_output=True, text=True, timeout=1000)
    assert set_up.returncode == 0, set_up.stdout[-3000:] + set_up.stderr[-3000:]
    print(f"set-up took {time.monotonic() - started:.0f} s")
    xensim = str(clone / ".venv" / "bin" / "xensim")
    version = subprocess.run([xensim, "--version"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == "xensim 0.1.0", version.stdout + version.stderr
    demo = subprocess.run([xensim, "demo", "--seconds", "1", "--no-trace"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert demo.returncode == 0 and "verdict" in demo.stdout, demo.stdout[-3000:] + demo.stderr[-3000:]
