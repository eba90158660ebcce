"""Who is calling: the domain tokens and the admin token, checked against call metadata.

Tokens live here, not in the core: the core stays deterministic (a replayed trace builds the
same domains), while a token must be unguessable. Each domain gets one at CreateDomain; it
names that domain only, so domain A's token can never act on domain B. It names the domain's
instance, not its domid: domids are reused once the counter wraps, and a token of a destroyed
domain must never act as the new domain that got its domid. Checks raise `Refused` with the
status code hypercalls.proto / toolstack.proto document, before anything runs, so a refused
call changes nothing.
"""

import hmac
import reprlib
import secrets
from collections.abc import Iterable, Mapping

import grpc

from hypervisor.core.domain import Domain

from .config import DECIMAL_NUMBER
from .errors import Refused

VCPU_KEY = "x-xen-vcpu"


def _bearer(metadata: Iterable) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class Tokens:
    """The admin token (None: toolstack calls need none) and one token per domain."""

    def __init__(self, admin_token: str | None):
        self.admin_token = admin_token
        self._domain_of: dict[str, tuple[int, int]] = {}  # token -> (domid, instance)
        self._token_of: dict[int, str] = {}  # instance -> token

    def issue(self, domid: int, instance: int) -> str:
        token = secrets.token_urlsafe(24)
        self._domain_of[token] = (domid, instance)
        self._token_of[instance] = token
        return token

    def revoke(self, instance: int) -> None:
        self._domain_of.pop(self._token_of.pop(instance, ""), None)

    def guest(self, metadata: Iterable, domains: Mapping[int, Domain]) -> tuple[int, int]:
        """The (domid, vcpu_id) a Hypercalls call acts as, given the live domains."""
        metadata = tuple(metadata)
        token = _bearer(metadata)
        if token is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing `authorization: Bearer <domain token>` metadata (CreateDomain returns the token)")
        domid, instance = self._domain_of.get(token, (None, None))
        domain = domains.get(domid)
        if domain is None or domain.instance != instance:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown domain token (was the domain destroyed?)")
        raw = next((value for key, value in metadata if key == VCPU_KEY), None)
        if raw is None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"missing `{VCPU_KEY}: <vCPU id>` metadata")
        count = len(domain.vcpus)
        if not DECIMAL_NUMBER.fullmatch(raw) or int(raw) >= count:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{VCPU_KEY} {reprlib.repr(raw)} is not a vCPU of dom{domid} (0..{count - 1})")
        return domid, int(raw)

    def admin(self, metadata: Iterable) -> None:
        """A Toolstack call: the admin token (any caller when the server runs without one),
        never a domain token."""
        token = _bearer(metadata)
        if token is not None and token in self._domain_of:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "a domain token cannot use the Toolstack service; use the admin token")
        if self.admin_token is None:
            return
        if token is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing `authorization: Bearer <admin token>` metadata (the hypervisor printed it at start)")
        if not hmac.compare_digest(token.encode(), self.admin_token.encode()):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "wrong admin token")
