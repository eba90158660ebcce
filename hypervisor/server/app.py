"""Serving: a grpc.aio server around a fresh core, its ready line, and a clean stop.

One asyncio loop runs every handler and so is the hypervisor lock (shared/reference/
transport.md section 0: grpc.aio, not the thread-pool server, whose streams each pin a worker;
benchmarks/server_model.py measures the two). Health checking and reflection are always on.
Once serving, stdout gets exactly one JSON line that other programs wait for:

    {"event": "ready", "listen": "127.0.0.1:PORT", "admin_token": "..." or null}

Everything else is logged to stderr. SIGINT and SIGTERM end every running call and stream with
UNAVAILABLE "server shutting down" and stop within the grace period.
"""

import argparse
import asyncio
import json
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hypervisor.core import Hypervisor, XenError
from xensim.errors import check_listen
from xensim.v1 import hypercalls_pb2, hypercalls_pb2_grpc, toolstack_pb2, toolstack_pb2_grpc

from . import errors
from .auth import Tokens
from .config import Config, config_from
from .errors import Refused
from .hypercalls import HypercallsServicer
from .reflection import Reflection
from .toolstack import ToolstackServicer
from .tracing import Tracing
from .vcpus import Runtime

log = logging.getLogger("xensim.server")

SERVER_OPTIONS = (
    # A second server on a taken port must fail, not silently share it (grpc/grpc#16920).
    ("grpc.so_reuseport", 0),
    # A Session message of 1024 page writes is just over grpc's default 4 MiB.
    ("grpc.max_receive_message_length", 16 << 20),
)
XENSIM_SERVICES = (
    hypercalls_pb2.DESCRIPTOR.services_by_name["Hypercalls"].full_name,
    toolstack_pb2.DESCRIPTOR.services_by_name["Toolstack"].full_name,
)


class ListenError(Exception):
    pass


async def serve(config: Config) -> int:
    hv = Hypervisor(nr_frames=config.frames)
    runtime = Runtime(hv)
    tokens = Tokens(config.admin_token)
    tracing = Tracing(hv)
    if config.trace:
        tracing.start_file(config.trace)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    hypercalls_pb2_grpc.add_HypercallsServicer_to_server(HypercallsServicer(runtime, tokens), server)
    toolstack_pb2_grpc.add_ToolstackServicer_to_server(ToolstackServicer(runtime, tokens, tracing), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (*XENSIM_SERVICES, health.SERVICE_NAME, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(Reflection(services, (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)), server)
    port = _listen(server, config)
    await server.start()
    for service in ("", *XENSIM_SERVICES):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # before the ready line, which invites them
        loop.add_signal_handler(signum, stop.set)
    listen = config.address.rsplit(":", 1)[0] + f":{port}"
    log.info("serving on %s (%d frames%s)", listen, config.frames, ", TLS" if config.tls else "")
    print(json.dumps({"event": "ready", "listen": listen, "admin_token": config.admin_token}), flush=True)
    await stop.wait()
    log.info("shutting down: ending every call and stream, %.1f s of grace", config.grace_s)
    await health_servicer.enter_graceful_shutdown()
    runtime.end_all(Refused(grpc.StatusCode.UNAVAILABLE, "server shutting down"))
    await server.stop(config.grace_s)
    _, write_error = tracing.stop_file()
    if write_error:  # the disk's doing, not the simulator's: logged, and no reason to fail
        log.warning("the file trace is incomplete: %s", write_error)
    if errors.internal_errors:
        log.error("%d INTERNAL errors (bugs of the simulator) happened; see above", errors.internal_errors)
        return 1
    return 0


def _listen(server: grpc.aio.Server, config: Config) -> int:
    """Bind now (grpc binds in add_*_port), so a taken port fails before the ready line."""
    try:
        if config.tls:
            port = server.add_secure_port(config.address, grpc.ssl_server_credentials([config.tls]))
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as e:
        raise ListenError(f"cannot listen on {config.address}: {e} (is another server using the port?)") from None
    if not port:
        raise ListenError(f"cannot listen on {config.address} (is another server using the port?)")
    return port


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The `serve` command."""
    config = config_from(args, parser)
    check_listen(config.host, config.port)  # a bad address or a taken port: one line, before gRPC's own logs
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return asyncio.run(serve(config))
    except (ListenError, XenError) as e:  # a taken port, an uncreatable --trace file
        log.error("%s", e)
        return 1
