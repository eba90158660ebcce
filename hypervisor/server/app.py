"""Serving: a grpc.aio server around a fresh core, its ready line, and a clean stop.

One asyncio loop runs every handler and so is the hypervisor lock (docs/transport.md section 0: grpc.aio, not the thread-pool server, whose streams each pin a worker;
benchmarks/server_model.py measures the two). Health checking and reflection are always on.
Once serving, stdout gets exactly one JSON line that other programs wait for:

    {"event": "ready", "listen": "127.0.0.1:PORT", "admin_token": "..." or null}

(with "metrics": "127.0.0.1:PORT" added when --metrics-port is given). Everything else is
logged to stderr, at --log-level: domains created and destroyed, Sessions opened and closed,
refused Toolstack calls, and every --log-interval a summary of the refused hypercalls.
SIGINT and SIGTERM end every running call and stream with UNAVAILABLE "server shutting down"
and stop within the grace period.
"""

import argparse
import asyncio
import json
import logging
import resource
import signal
import sys

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hypervisor.core import Hypervisor, XenError
from xensim.errors import check_listen
from xensim.v1 import hypercalls_pb2, toolstack_pb2

from . import errors
from .auth import Tokens
from .config import Config, Connections, config_from
from .errors import BadRequest, Refused, abort
from .hypercalls import HypercallsServicer
from .observe import Metrics, log_refusals
from .reflection import Reflection
from .schedule import gate, write_schedule
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
HYPERCALLS = hypercalls_pb2.DESCRIPTOR.services_by_name["Hypercalls"]
TOOLSTACK = toolstack_pb2.DESCRIPTOR.services_by_name["Toolstack"]
XENSIM_SERVICES = (HYPERCALLS.full_name, TOOLSTACK.full_name)


FD_RESERVE = 64  # file descriptors the server keeps for itself (listener, poller, trace file, ...)


class ListenError(Exception):
    pass


async def serve(config: Config) -> int:
    hv = Hypervisor(nr_frames=config.frames)
    runtime = Runtime(hv)
    if config.schedule.controlled:
        runtime.gate = gate(runtime, config)
    tokens = Tokens(config.admin_token)
    tracing = Tracing(hv)
    if config.trace:
        tracing.start_file(config.trace)
    server = grpc.aio.server(options=SERVER_OPTIONS + _connection_options(config.connections), maximum_concurrent_rpcs=config.connections.max_calls)
    _add_service(server, HYPERCALLS, HypercallsServicer(runtime, tokens))
    _add_service(server, TOOLSTACK, ToolstackServicer(runtime, tokens, tracing))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (*XENSIM_SERVICES, health.SERVICE_NAME, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(Reflection(services, (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)), server)
    port = _listen(server, config)
    host = config.address.rsplit(":", 1)[0]
    ready = {"event": "ready", "listen": f"{host}:{port}", "admin_token": config.admin_token}
    metrics = None
    if config.metrics_port is not None:
        try:
            metrics = await Metrics(runtime).serve(config.host, config.metrics_port)
        except OSError as e:
            raise ListenError(f"cannot serve metrics on {host}:{config.metrics_port}: {e.strerror}") from None
        ready["metrics"] = f"{host}:{metrics.sockets[0].getsockname()[1]}"
        log.info("Prometheus metrics on http://%s/metrics", ready["metrics"])
    summaries = asyncio.create_task(log_refusals(runtime, config.log_interval_s))
    await server.start()
    for service in ("", *XENSIM_SERVICES):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # before the ready line, which invites them
        loop.add_signal_handler(signum, stop.set)
    log.info("serving on %s (%d frames%s)", ready["listen"], config.frames, ", TLS" if config.tls else "")
    print(json.dumps(ready), flush=True)
    await stop.wait()
    log.info("shutting down: ending every call and stream, %.1f s of grace", config.grace_s)
    await health_servicer.enter_graceful_shutdown()
    runtime.end_all(Refused(grpc.StatusCode.UNAVAILABLE, "server shutting down"))
    await server.stop(config.grace_s)
    summaries.cancel()
    if metrics is not None:
        metrics.close()
    if runtime.gate is not None and config.schedule_file:
        write_schedule(runtime.gate, config.schedule_file)
    _, write_error = tracing.stop_file()
    if write_error:  # the disk's doing, not the simulator's: logged, and no reason to fail
        log.warning("the file trace is incomplete: %s", write_error)
    if errors.internal_errors:
        log.error("%d INTERNAL errors (bugs of the simulator) happened; see above", errors.internal_errors)
        return 1
    return 0


def _connection_options(limits: Connections) -> tuple[tuple[str, int], ...]:
    """grpc's options for README's connection limits. Connections are capped below the
    open-file limit, which is first raised as far as it goes: at the limit, grpc accepts and
    closes each new connection, so the server never runs out of file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    except (ValueError, OSError):  # an unlimited hard limit the kernel will not grant
        pass
    max_connections = min(limits.max_connections, soft - FD_RESERVE)
    if max_connections < limits.max_connections:
        log.warning("at most %d connections: the open-file limit is %d (ulimit -n)", max_connections, soft)
    idle_ms, keepalive_ms, keepalive_timeout_ms = (round(s * 1000) for s in (limits.idle_timeout_s, limits.keepalive_s, limits.keepalive_timeout_s))
    return (
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.max_concurrent_streams", limits.max_streams),
        ("grpc.max_connection_idle_ms", idle_ms),
        ("grpc.server_handshake_timeout_ms", idle_ms),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        # A ping's own timeout (default 60 s) is what grpc arms when it sends one; the keepalive
        # timeout only takes its place in some states (chttp2 writing.cc, end_write).
        ("grpc.http2.ping_timeout_ms", keepalive_timeout_ms),
        # Keep pinging while nothing else is sent: a Session whose vCPU is blocked is quiet.
        ("grpc.http2.max_pings_without_data", 0),
    )


def _add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer) -> None:
    """Serve `service` with `servicer`'s methods, as the generated add_*Servicer_to_server
    does, except that bytes which do not parse as the request are INVALID_ARGUMENT with a
    BadRequest (common.proto's error model), not a bug of the simulator.

    grpc parses a unary request before the handler runs and answers a DecodeError with UNKNOWN;
    so a unary handler gets the raw bytes and parses them itself, before authentication. A
    streaming handler parses in `context.read()`, where the BadRequest ends the stream."""
    handlers = {}
    for method in service.methods:
        parse = _parser(method)
        behaviour = getattr(servicer, method.name)
        kind = _HANDLER_KINDS[method.client_streaming, method.server_streaming]
        response = message_factory.GetMessageClass(method.output_type).SerializeToString
        if method.client_streaming:
            handlers[method.name] = kind(behaviour, request_deserializer=parse, response_serializer=response)
        else:
            handlers[method.name] = kind(_parsing(behaviour, parse, method.name), response_serializer=response)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _parser(method: MethodDescriptor):
    """bytes -> the method's request message, or BadRequest for bytes that are none."""
    parse = message_factory.GetMessageClass(method.input_type).FromString

    def parsed(raw: bytes) -> Message:
        try:
            return parse(raw)
        except DecodeError as e:
            raise BadRequest("", f"undecodable request: {e}") from None

    return parsed


def _parsing(behaviour, parse, name: str):
    """A unary-request handler that takes the raw bytes and parses them first."""

    async def handler(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = parse(raw)
        except BadRequest as exc:
            await abort(context, exc, name)
        return await behaviour(request, context)

    return handler


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
    logging.basicConfig(stream=sys.stderr, level=config.log_level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return asyncio.run(serve(config))
    except (ListenError, XenError) as e:  # a taken port, an uncreatable --trace file
        log.error("%s", e)
        return 1
