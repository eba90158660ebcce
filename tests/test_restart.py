"""A vCPU process killed mid-run and restarted (docs/linux.md section 17): the new process
takes over what its predecessor owned, so a run with kills ends holding no mm but the
kernel's own. Controlled runs (docs/schedule.md section 10) replay their kill points."""

import json

import pytest

from xensim.launch import run, xensim_command

SMALL = ("stress", "--domains", "1", "--vcpus", "2", "--pages", "1024", "--steps", "1500", "--kill-vcpus", "7")


def _stress(tmp_path, *args: str) -> tuple[dict, int]:
    """A small controlled stress run with scheduled kills; its report and exit status."""
    report_file = tmp_path / "report.json"
    done = run(xensim_command(*SMALL, *args, "--json", str(report_file), "--schedule-file", str(tmp_path / "schedule.json")), timeout=240)
    return json.loads(report_file.read_text()), done.returncode


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("seed", "sizes"), [(3, "64"), (3, "32"), (5, "64"), (9, "32,64")])
def test_a_killed_vcpus_mms_are_exited_by_its_restarted_process(tmp_path, seed, sizes):
    """Before the takeover, pct:3 left 4 mms in the 64-bit domain after its 2 kills and 3 in
    the PAE one: the dead processes' parents and in-flight children, still pinned."""
    report, status = _stress(tmp_path, "--schedule", f"pct:{seed}", "--address-sizes", sizes, *(("--domains", "2") if "," in sizes else ()))
    assert report["killed_vcpus"] >= 1 and report["kernel_bugs"] == [] and report["unfinished_vcpus"] == 0
    assert set(report["leaked_mms"].values()) == {0} and len(report["leaked_mms"]) == len(report["domains"]) and status == 0, report["leaked_mms"]
