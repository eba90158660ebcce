"""The `xensim` command's programs run and report what they promise (no timing asserted)."""

import gzip
import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from tests.core.test_trace import frame_ends, record_a_run
from xensim import launch
from xensim.cli import main
from xensim.demo import COLUMNS, _table
from xensim.stress import StressConfig, StressRun, VcpuState

PREFIX = "the trace ends without its end record: replayed as a prefix, final state not compared"


def test_bench_core_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "core", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("core.validate_entries_per_s", "core.validate_entries_per_s_pv32", "core.cr3_unpinned_over_pinned"):
        assert report[key]["value"] > 0 and report[key]["unit"]
    assert report["core.validate_entries_per_s"]["entries_per_pin"] == 70 * 512
    assert report["core.validate_entries_per_s_pv32"]["entries_per_pin"] == 69 * 512  # L3, 3 + 1 L2s, 64 L1s


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("empty.jsonl", b"", "empty: not a xensim trace"),
        ("garbage.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a xensim trace"),
        ("garbage.jsonl.gz", b"not gzip at all\n", "Not a gzipped file"),
        ("headless.jsonl", b'{"caller":null,"op":"xen_version","args":{}}\n', "line 1 is not a xensim trace header"),
    ],
)
def test_replay_of_a_file_that_is_not_a_trace_says_so_in_one_line(tmp_path, capsys, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    status, out, err = _cli(["replay", str(path)], capsys)
    assert (status, out) == (2, "") and err.count("\n") == 1 and says in err and str(path) in err


def test_replay_of_a_missing_file_says_so_in_one_line(tmp_path, capsys):
    status, out, err = _cli(["replay", str(tmp_path / "nowhere.jsonl")], capsys)
    assert (status, out) == (2, "") and err.count("\n") == 1 and "No such file or directory" in err


def test_replay_of_a_cut_trace_replays_its_whole_records_as_a_prefix(tmp_path, capsys):
    trace = record_a_run()[0]
    cut = trace[: trace.index(b"EBUSY")]  # inside the record of the failed make_writable
    path = tmp_path / "cut.trace"
    path.write_bytes(cut)
    status, out, err = _cli(["replay", str(path)], capsys)
    whole = len(frame_ends(cut)) - 2  # the whole records after the header (the last end is past the cut)
    assert (status, err) == (0, "") and PREFIX in out and f"replayed {whole} calls: 0 mismatches" in out
    assert f"record {whole + 2} is cut short (its writer stopped mid-record): skipped" in out


def test_replay_of_a_cut_gz_trace_replays_what_decompresses_as_a_prefix(tmp_path, capsys):
    compressed = gzip.compress(record_a_run()[0])
    path = tmp_path / "cut.trace.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    status, out, err = _cli(["replay", str(path)], capsys)
    assert (status, err) == (0, "") and PREFIX in out and "0 mismatches" in out


def test_the_demo_table_fits_80_columns_with_every_column_shown():
    run = StressRun(StressConfig(vcpus=4, seconds=20))
    run.vcpus = [VcpuState(1, v, progress={**dict.fromkeys(COLUMNS, 123456), "messages": 99_999, "bugs": 7}) for v in range(4)]
    console = Console(file=io.StringIO(), width=80)
    console.print(_table(run, {"calls": 123456.0, "errors": {("mmu_update", "EBUSY"): 2}}, 1.0))
    shown = console.file.getvalue()
    assert max(len(line) for line in shown.splitlines()) <= 80, shown
    assert all(heading.split("\n")[0] in shown for heading in COLUMNS.values()) and "kernel" in shown and "BUGs" in shown
    assert shown.count(" 7\n") == 4 and "…" not in shown and "2 mmu_update -EBUSY" in shown, shown


def test_demo_traces_go_to_the_user_cache_and_the_oldest_go_past_its_cap(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(launch, "TRACE_CACHE_BYTES", 3000)
    traces = tmp_path / "xensim" / "traces"
    traces.mkdir(parents=True)
    for age in range(5):  # 1000 bytes each, the first the newest; format 2's and format 3's names
        old = traces / f"demo-{age}.{('jsonl', 'trace')[age % 2]}.gz"
        old.write_bytes(bytes(1000))
        os.utime(old, (1e9 - age, 1e9 - age))
    new = launch.default_trace()
    assert Path(new).parent == traces and not Path(new).exists() and new.endswith(".trace.gz")
    assert sorted(p.name for p in traces.iterdir()) == ["demo-0.jsonl.gz", "demo-1.trace.gz", "demo-2.jsonl.gz"]


COMMANDS = {
    "replay": lambda path, out: ["replay", path],
    "timeline": lambda path, out: ["timeline", path, "--html", out],
    "explain": lambda path, out: ["trace", "explain", path],
    "export": lambda path, out: ["trace", "export", path, "--out", out],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_trace_reader_says_in_one_line_that_a_damaged_trace_is_damaged(tmp_path, capsys, command):
    """A record in the middle whose length says less than its frame holds: one line naming
    the file and the record, exit status 2, no traceback."""
    trace = bytearray(record_a_run()[0])
    third = frame_ends(bytes(trace))[2]
    trace[third : third + 4] = (8).to_bytes(4, "little")
    path = tmp_path / "damaged.trace"
    path.write_bytes(trace)
    status, out, err = _cli(COMMANDS[command](str(path), str(tmp_path / "out")), capsys)
    assert (status, out) == (2, "") and err.count("\n") == 1 and str(path) in err and "record 4 is damaged" in err, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_trace_reader_reads_a_cut_trace_as_the_run_so_far(tmp_path, capsys, command):
    trace = record_a_run()[0]
    path = tmp_path / "cut.trace"
    path.write_bytes(trace[: frame_ends(trace)[-3] + 7])
    status, out, err = _cli(COMMANDS[command](str(path), str(tmp_path / "out")), capsys)
    assert (status, err) == (0, "") and out


def test_bench_scale_writes_every_key_over_a_small_configuration(tmp_path, monkeypatch):
    """The scale group's keys and growth tables, on machines and domains small enough for CI:
    each figure is there, and the guests booted and worked (else the group fails)."""
    from xensim.bench import scale

    for name, value in {"MACHINE_SHIFTS": (14, 15), "DOMAIN_MIB": (16, 32), "DOMAIN_COUNTS": (1, 3), "BOOT_MIB": (16, 32), "GIB_16": 1 << 15, "REPEAT": 1}.items():
        monkeypatch.setattr(scale, name, value)
    monkeypatch.setattr(scale, "BOOT_KEYS", {"scale.boot_s_1gib": 16, "scale.boot_s_4gib": 32})
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "scale", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("list_domains_ms_256_on_16gib", "audit_one_domain_ms_16mib_on_16gib", "create_ms_4gib", "destroy_ms_4gib", "audit_ms_4gib", "boot_s_1gib", "boot_s_4gib"):
        assert report[f"scale.{key}"]["value"] > 0 and report[f"scale.{key}"]["unit"], key
    assert list(report["scale.by_machine_frames"]["table"]) == ["2^14", "2^15"]
    assert list(report["scale.by_domain_size"]["table"]) == ["16 MiB", "32 MiB"]
    assert list(report["scale.by_domain_count"]["table"]) == ["1 domains", "3 domains"]
    assert set(report["scale.by_domain_count"]["table"]["3 domains"]) == {"list_domains_ms", "audit_one_domain_ms", "audit_ms"}
    assert len(report["scale.by_guest_size"]["rows"]) == 3
