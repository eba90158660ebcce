"""Watching a running server: Prometheus metrics (--metrics-port) and summaries of refused
hypercalls in the log (--log-level, --log-interval).

Both read the model from the server's one asyncio loop, between calls, like every handler:
the metrics endpoint is a small HTTP server on that loop (not prometheus_client's own
thread, which would read the model while a call changes it), and the counts come from the
core's Stats at scrape time, so a hypercall pays nothing for metrics except, when they are
on, one latency observation (`Runtime.observe`).
"""

import asyncio
import logging
from collections import Counter

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from hypervisor.core.hypervisor import HYPERCALLS

from .vcpus import Runtime

log = logging.getLogger("xensim.server")

# Hypercall latency buckets in seconds: most core calls take microseconds, validating a big
# tree milliseconds.
LATENCY_BUCKETS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0)


class _Model:
    """A collector that reads the model at scrape time."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def collect(self):
        hv = self.runtime.hv
        calls = CounterMetricFamily("xensim_calls", "Calls since the server started, by op (hypercall, memory access or toolstack op) and outcome (ok or the Xen errno)", labels=["op", "outcome"])
        for (op, outcome), n in sorted(hv.stats.items()):
            calls.add_metric([op, outcome], n)
        yield calls
        yield GaugeMetricFamily("xensim_domains", "Domains that exist", value=len(hv.domains))
        yield GaugeMetricFamily("xensim_frames", "Machine memory in 4 KiB frames", value=hv.nr_frames)
        yield GaugeMetricFamily("xensim_frames_free", "Frames no domain and not Xen owns", value=hv.frames.free_frames())
        yield GaugeMetricFamily("xensim_sessions_open", "vCPU Session streams open", value=self.runtime.sessions_open())


class Metrics:
    """The registry: the model's counts and gauges, and the hypercall latency histogram."""

    def __init__(self, runtime: Runtime):
        self.registry = CollectorRegistry()
        self.registry.register(_Model(runtime))
        self.latency = Histogram("xensim_hypercall_seconds", "Time a hypercall spends in the core (a SCHEDOP_block's sleep excluded)", ["op"], registry=self.registry, buckets=LATENCY_BUCKETS)
        runtime.observe = self.observe

    def observe(self, op: str, seconds: float) -> None:
        self.latency.labels(op).observe(seconds)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        """An HTTP endpoint answering every GET with the metrics (Prometheus scrapes /metrics;
        any path will do), in the format the scraper's Accept header asks for."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                accept = next((line.split(":", 1)[1] for line in request.split("\r\n") if line.lower().startswith("accept:")), "")
                encode, content_type = choose_encoder(accept)
                body = encode(self.registry)
                head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                writer.write(head.encode() + body)
                await writer.drain()
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                pass  # a client that went away or sent no request
            finally:
                writer.close()

        return await asyncio.start_server(answer, host, port)


async def log_refusals(runtime: Runtime, interval_s: float) -> None:
    """Every `interval_s`, one log line summing up the hypercalls refused since the last one
    (a hostile or buggy guest can fail thousands a second; one line each would drown the
    log), by op and errno. Quiet while nothing is refused."""
    seen: Counter = Counter()
    while True:
        await asyncio.sleep(interval_s)
        now = Counter({key: n for key, n in runtime.hv.stats.items() if key[0] in HYPERCALLS and key[1] != "ok"})
        new = now - seen
        seen = now
        if new:
            summary = ", ".join(f"{op} {errno} x{n}" for (op, errno), n in sorted(new.items()))
            log.info("refused hypercalls in the last %.0f s: %s", interval_s, summary)
