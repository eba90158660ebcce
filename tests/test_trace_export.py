"""`xensim trace export --format chrome`: the lazy-TLB race trace as Trace Event JSON, checked
against the format's documented structure (the Trace Event Format document: the JSON object
form with `traceEvents`; phases X, i, s, f, M and the fields each requires)."""

import json

from xensim.cli import main

from .test_timeline import race_trace

REQUIRED = {"name", "ph", "pid", "tid", "ts"}


def export(tmp_path) -> tuple[dict, dict]:
    trace, run = race_trace()
    (tmp_path / "run.trace").write_bytes(trace)
    out = tmp_path / "run.json"
    assert main(["trace", "export", str(tmp_path / "run.trace"), "--format", "chrome", "--out", str(out)]) == 0
    return json.loads(out.read_text()), run


def test_every_event_has_the_fields_its_phase_requires(tmp_path):
    document, _ = export(tmp_path)
    events = document["traceEvents"]
    assert document["displayTimeUnit"] in ("ms", "ns") and events
    for event in events:
        assert REQUIRED <= event.keys(), event
        assert isinstance(event["ts"], (int, float)) and isinstance(event["pid"], int) and isinstance(event["tid"], int)
        assert event["ph"] in {"X", "i", "s", "f", "M"}, event
        if event["ph"] == "X":
            assert event["dur"] > 0
        if event["ph"] == "i":
            assert event["s"] in {"g", "p", "t"}
        if event["ph"] == "M":
            assert event["name"] in {"process_name", "thread_name"} and isinstance(event["args"]["name"], str)
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts.keys() == ends.keys() and starts
    assert all(ends[i]["ts"] >= starts[i]["ts"] and ends[i]["cat"] == starts[i]["cat"] for i in starts)


def test_tracks_calls_failures_and_the_ipi_are_where_they_happened(tmp_path):
    document, run = export(tmp_path)
    events = document["traceEvents"]
    d = run["domid"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[(d, 0)] == "vCPU0" and names[(d, 1)] == "vCPU1" and names[(d, 1001)] == "vCPU1 cr3"
    failures = [(e["pid"], e["tid"], e["name"]) for e in events if e["ph"] == "i"]
    assert failures == [(d, 0, "mmu_update -EBUSY"), (d, 0, "mmuext_op -EINVAL")]
    busy = next(e for e in events if e["ph"] == "i" and "EBUSY" in e["name"])
    assert f"0x{run['l4']:x}" in busy["args"]["message"]
    (ipi,) = [e for e in events if e["ph"] == "s"]
    (arrival,) = [e for e in events if e["ph"] == "f"]
    assert (ipi["pid"], ipi["tid"], arrival["pid"], arrival["tid"]) == (d, 0, d, 1)
    # vCPU 1 sat on the unpinned table: a slice on its cr3 track names it.
    assert any(e["ph"] == "X" and e["tid"] == 1001 and e["name"] == f"cr3 0x{run['l4']:x}" for e in events)
    multicall = next(e for e in events if e["ph"] == "X" and e["name"].startswith("multicall"))
    assert multicall["args"]["errors"] and len(multicall["args"]["lines"]) == 2
