"""Every way a call can fail, mapped to a google.rpc.Status: the one place that does it.

A Xen errno becomes the status code that common.proto's XenErrno comments give, with an
ErrorInfo (domain "xen") the guest can act on; malformed input is INVALID_ARGUMENT with a
BadRequest naming the field; a call from a vCPU that Xen does not run is FAILED_PRECONDITION
with an ErrorInfo (domain "xensim", reason VCPU_NOT_RUNNING); a refused caller gets
UNAUTHENTICATED, PERMISSION_DENIED, ... with a message only. Anything else is a bug of the simulator: INTERNAL, logged loudly with its
traceback and counted, never dressed as an errno (one mapping, as Firecracker's API layer has).
"""

import logging
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from hypervisor.core import VcpuNotRunning, XenError
from hypervisor.core.abi import Errno

log = logging.getLogger("xensim.server")

# common.proto, enum XenErrno: "gRPC code ..." on each value (tests/server keep them in step).
XEN_CODES: dict[Errno, int] = {
    Errno.EPERM: code_pb2.PERMISSION_DENIED,
    Errno.ENOENT: code_pb2.NOT_FOUND,
    Errno.ESRCH: code_pb2.NOT_FOUND,
    Errno.ENXIO: code_pb2.NOT_FOUND,
    Errno.E2BIG: code_pb2.OUT_OF_RANGE,
    Errno.EAGAIN: code_pb2.UNAVAILABLE,
    Errno.ENOMEM: code_pb2.RESOURCE_EXHAUSTED,
    Errno.EACCES: code_pb2.PERMISSION_DENIED,
    Errno.EFAULT: code_pb2.FAILED_PRECONDITION,
    Errno.EBUSY: code_pb2.FAILED_PRECONDITION,
    Errno.EEXIST: code_pb2.ALREADY_EXISTS,
    Errno.EINVAL: code_pb2.FAILED_PRECONDITION,
    Errno.ENOSPC: code_pb2.RESOURCE_EXHAUSTED,
    Errno.ERANGE: code_pb2.OUT_OF_RANGE,
    Errno.ENOSYS: code_pb2.UNIMPLEMENTED,
    Errno.EILSEQ: code_pb2.FAILED_PRECONDITION,
    Errno.EOPNOTSUPP: code_pb2.UNIMPLEMENTED,
}


class BadRequest(Exception):
    """Malformed protobuf input that never reached Xen: `field` is its path in the request
    (e.g. `calls[3].load.size`; empty for bytes that are no request at all)."""

    def __init__(self, field: str, description: str):
        super().__init__(f"{field}: {description}" if field else description)
        self.field = field
        self.description = description


class Refused(Exception):
    """A call refused before it ran (authentication, a second Session, a destroyed domain,
    shutdown): a plain status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class PeerGone(Exception):
    """A message could not be written to a stream because its client went away: grpc fails the
    write (ExecuteBatchError) before it cancels the handler. Not a bug, and nobody is left to
    tell, so the handler just ends."""


async def write(context: grpc.aio.ServicerContext, message, who: str) -> None:
    """`context.write`, with a client that went away as PeerGone (grpc's own error type for
    it, ExecuteBatchError, would otherwise be an INTERNAL bug)."""
    try:
        await context.write(message)
    except Exception as exc:  # noqa: BLE001 - ExecuteBatchError is not a public grpc type
        raise PeerGone(f"{who}: the client went away") from exc


internal_errors = 0  # bugs of the simulator seen since start (tests assert none)


def _packed(detail) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def xen_status(errno: Errno, message: str, hypercall: str, index: int | None = None, done: int | None = None) -> status_pb2.Status:
    """A Xen errno as common.proto's error model says: `NAME (n): message` and an ErrorInfo."""
    metadata = {"errno": str(int(errno)), "hypercall": hypercall}
    if index is not None:
        metadata["index"] = str(index)
    if done is not None:
        metadata["done"] = str(done)
    info = error_details_pb2.ErrorInfo(reason=errno.name, domain="xen", metadata=metadata)
    return status_pb2.Status(code=XEN_CODES[errno], message=f"{errno.name} ({int(errno)}): {message}", details=[_packed(info)])


def status_of(exc: BaseException, hypercall: str) -> status_pb2.Status:
    """The status a call that raised `exc` fails with; `hypercall` names the call (Xen's name,
    or the toolstack op) for the ErrorInfo and the log."""
    if isinstance(exc, XenError):
        return xen_status(exc.errno, exc.message, hypercall, exc.index, exc.done)
    if isinstance(exc, VcpuNotRunning):
        info = error_details_pb2.ErrorInfo(reason="VCPU_NOT_RUNNING", domain="xensim", metadata={"hypercall": hypercall})
        return status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=str(exc), details=[_packed(info)])
    if isinstance(exc, BadRequest):
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)
        bad = error_details_pb2.BadRequest(field_violations=[violation])
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc), details=[_packed(bad)])
    if isinstance(exc, Refused):
        return status_pb2.Status(code=exc.code.value[0], message=exc.message)
    global internal_errors
    internal_errors += 1
    log.error("INTERNAL error (a bug of the simulator) in %s", hypercall, exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error of the simulator in {hypercall} ({type(exc).__name__}); see the hypervisor's log")


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, hypercall: str) -> NoReturn:
    """End an RPC with the status `exc` maps to."""
    await abort_with(context, status_of(exc, hypercall))


async def abort_with(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> NoReturn:
    await context.abort_with_status(rpc_status.to_status(status))
