"""The `xensim` command's programs run and report what they promise (no timing asserted)."""

import json

from xensim.cli import main


def test_bench_core_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "core", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("core.validate_entries_per_s", "core.cr3_unpinned_over_pinned"):
        assert report[key]["value"] > 0 and report[key]["unit"]
    assert report["core.validate_entries_per_s"]["entries_per_pin"] == 70 * 512
