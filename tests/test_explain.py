"""`xensim trace explain` and the explanations stress prints: the failed call's number, the
vCPUs involved, who held the frames its error names at that moment (the trace replayed up to
it), and the command that opens the focused timeline."""

import io

import pytest

from hypervisor.core import Hypervisor
from hypervisor.core.abi import ENTRIES_PER_TABLE, MmuextCmd
from hypervisor.core.trace import TraceWriter
from xensim.cli import main
from xensim.explain import explain
from xensim.launch import run, xensim_command

from .core.guest import Guest
from .test_timeline import race_trace


def test_the_ebusy_is_explained_by_the_vcpu_still_on_the_table(tmp_path):
    trace, run = race_trace()
    path = tmp_path / "run.trace"
    path.write_bytes(trace)
    first, second = explain(str(path))  # the EBUSY and the multicall's EINVAL
    d = run["domid"]
    busy = first["data"]
    assert "EBUSY" in busy["errors"][0] and busy["caller"] == f"dom{d} vCPU0"
    assert busy["vcpus"] == [f"dom{d} vCPU0", f"dom{d} vCPU1"]
    (l4,) = [f for f in busy["frames"] if f["frame"]["mfn"] == hex(run["l4"])]
    # At that moment: unpinned, its one type reference vCPU 1's base pointer.
    assert l4["bases"] == [{"domid": d, "vcpu": 1, "base": "kernel"}] and not l4["frame"]["pinned"]
    assert l4["type_holders"]["base pointers"] == 1 == l4["frame"]["type_count"]
    assert busy["timeline"] == f"xensim timeline {path} --html focus-{busy['seq']}.html --focus {busy['seq']}"
    assert "multicall" not in busy["errors"][0] and second["data"]["seq"] > busy["seq"]
    # By the end of the run vCPU 1 had left: only a replay to the failure shows the holder.
    assert main(["trace", "explain", str(path), "--seq", str(busy["seq"])]) == 0


def test_a_report_picks_its_failure_by_the_message_it_quotes(tmp_path, capsys):
    trace, run = race_trace()
    path = tmp_path / "run.trace"
    path.write_bytes(trace)
    einval = explain(str(path))[1]["data"]["errors"][0]
    message = einval.split(": ", 2)[2]
    (only,) = explain(str(path), matching=[f"kernel BUG on vCPU 0 in somewhere: -EINVAL from multicall: {message}", "an unrelated report"])
    assert only["data"]["errors"] == [einval]
    assert main(["trace", "explain", str(path), "--seq", "1"]) == 0 and capsys.readouterr().out.strip() == "no failed calls"


@pytest.mark.timeout(200)
def test_stress_explains_its_kernel_bugs(tmp_path):
    trace = tmp_path / "stress.trace"
    done = run(xensim_command("stress", "--domains", "1", "--vcpus", "4", "--seconds", "4", "--variant", "none", "--trace", str(trace)), timeout=180)
    assert done.returncode == 1 and "kernel BUG: " in done.stdout, done.stdout + done.stderr
    assert "  vCPUs involved: dom1 vCPU" in done.stdout and "base pointer (cr3) of dom1 vCPU" in done.stdout
    assert f"  see it: xensim timeline {trace} --html focus-" in done.stdout


def test_a_multicall_that_went_on_part_way_is_explained_by_its_own_entries(tmp_path):
    """A preempted call goes on in records of their own, with "resume" in place of "args"
    (docs/preemption.md): its failed entries are those of the call it began as."""
    hv = Hypervisor(nr_frames=1 << 14, preempt_work=2 * ENTRIES_PER_TABLE)
    guest, other = Guest(hv, nr_pages=4096), Guest(hv)
    guest.leave_boot_tree()
    out = io.BytesIO()
    hv.tracer = writer = TraceWriter(hv, out)
    pins = [{"op": "mmuext_op", "args": {"ops": [[MmuextCmd.PIN_L4_TABLE, l4, 0]]}} for l4 in (guest.l4, other.l4)]
    results, stops = guest.go_on(guest.call("multicall", calls=pins))
    writer.close()
    assert stops and results[0] == {"result": 1} and results[1]["errno"] == "EINVAL"
    path = tmp_path / "run.trace"
    path.write_bytes(out.getvalue())
    (only,) = explain(str(path))
    assert only["data"]["errors"] == [f"mmuext_op: EINVAL: {results[1]['message']}"]
    assert only["data"]["caller"] == f"dom{guest.domid} vCPU0"
