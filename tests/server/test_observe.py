"""Watching a running server: `serve --metrics-port` scraped as Prometheus does, and what
`serve --log-level` writes (domains, Sessions, refused Toolstack calls, summaries of refused
hypercalls)."""

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import TEST_FRAMES, start_server
from xensim.v1 import common_pb2, toolstack_pb2

from .helpers import SessionClient, WireGuest

pytestmark = pytest.mark.timeout(60)


def scrape(address: str) -> dict:
    """{(sample name, labels as sorted tuple): value} from the endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def refuse_an_unpin(guest: WireGuest) -> None:
    """UNPIN of a frame that is not pinned: EINVAL."""
    with pytest.raises(grpc.RpcError):
        guest.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, guest.alloc()[1]))


def test_metrics_count_calls_by_op_and_errno_and_show_the_machine():
    with start_server("--metrics-port", "0") as server:
        guest = WireGuest(server)
        refuse_an_unpin(guest)
        session = SessionClient(guest.hc, guest.md(0))
        session.push()  # VcpuStarted: the stream is attached
        metrics = scrape(server.ready["metrics"])
        session.close()
    assert metrics[("xensim_calls_total", (("op", "mmuext_op"), ("outcome", "EINVAL")))] == 1
    assert metrics[("xensim_calls_total", (("op", "create_domain"), ("outcome", "ok")))] == 1
    assert metrics[("xensim_domains", ())] == 1 and metrics[("xensim_sessions_open", ())] == 1
    assert metrics[("xensim_frames", ())] == TEST_FRAMES > metrics[("xensim_frames_free", ())] > TEST_FRAMES - 2048 - 32
    loads = metrics[("xensim_calls_total", (("op", "load"), ("outcome", "ok")))]
    assert loads >= 1 and metrics[("xensim_hypercall_seconds_count", (("op", "load"),))] == loads
    assert metrics[("xensim_hypercall_seconds_bucket", (("le", "+Inf"), ("op", "mmuext_op")))] == 1


def test_a_taken_metrics_port_is_one_error_line():
    with start_server("--metrics-port", "0") as first:
        taken = first.ready["metrics"].rsplit(":", 1)[1]
        with pytest.raises(RuntimeError, match=rf"cannot serve metrics on 127.0.0.1:{taken}"):
            with start_server("--metrics-port", taken):
                pass


def test_the_log_tells_domains_sessions_and_refusals():
    with start_server("--log-interval", "0.2", admin_token="log-test-token") as server:
        guest = WireGuest(server)
        session = SessionClient(guest.hc, guest.md(0))
        session.push()  # VcpuStarted: the stream is attached
        session.close()
        for _ in range(3):
            refuse_an_unpin(guest)
        with pytest.raises(grpc.RpcError):
            server.toolstack().DomainInfo(toolstack_pb2.DomainInfoRequest(domid=guest.domid), metadata=(("authorization", "Bearer nope"),), timeout=10)
        server.toolstack().DestroyDomain(toolstack_pb2.DestroyDomainRequest(domid=guest.domid), metadata=server.toolstack_metadata(), timeout=10)
        deadline = time.monotonic() + 10
        while not all(line in server.stderr() for line in ("refused hypercalls", "Session closed")) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.stderr()
    d = guest.domid
    assert f"Toolstack create_domain(nr_pages=2048, nr_vcpus=2): domid={d}, start_info={{...}}" in log
    assert guest.token not in log
    assert f"dom{d} vCPU 0: Session opened by ipv4:127.0.0.1:" in log and f"dom{d} vCPU 0: Session closed" in log
    assert "WARNING: Toolstack domain_info from ipv4:127.0.0.1:" in log and "refused: wrong admin token" in log
    assert "refused hypercalls in the last 0 s: mmuext_op EINVAL x3" in log
    assert f"Toolstack destroy_domain(domid={d}): freed_frames=" in log


def test_log_level_warning_keeps_only_the_refusals():
    with start_server("--log-level", "warning") as server:
        guest = WireGuest(server)
        with pytest.raises(grpc.RpcError):
            guest.toolstack("DomainInfo", toolstack_pb2.DomainInfoRequest(domid=99))
        log = server.stderr()
    assert "create_domain" not in log and "serving on" not in log
    assert "Toolstack domain_info from" in log and "refused: -ESRCH: no domain 99" in log


def test_log_level_debug_adds_the_views_briefly():
    with start_server("--log-level", "debug") as server:
        guest = WireGuest(server)
        guest.toolstack("DumpP2M", toolstack_pb2.DumpP2MRequest(domid=guest.domid))
        log = server.stderr()
    assert f"DEBUG: Toolstack dump_p2m(domid={guest.domid}): mfns=[2048]" in log
