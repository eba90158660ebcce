"""The committed xensim/v1 package is exactly what scripts/gen_proto.py makes of proto/.

A .proto edited without regenerating, or a hand-edited generated file, fails here.
"""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMITTED = REPO / "xensim" / "v1"


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def test_committed_xensim_v1_matches_fresh_generation(tmp_path):
    pytest.importorskip(
        "grpc_tools", reason="grpcio-tools is not installed: pip install -e '.[test]' to check staleness")
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh, committed = _files(tmp_path / "xensim" / "v1"), _files(COMMITTED)
    fix = "run `python scripts/gen_proto.py` and commit xensim/v1"
    assert sorted(fresh) == sorted(committed), f"generated file set differs; {fix}"
    stale = [name for name in sorted(fresh) if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}; {fix}"
