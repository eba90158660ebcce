"""A booted domain on the real test server, driven in-process, for tests of guestlib's client.

`boot(server)` creates a domain through the Toolstack, opens vCPU 0's Session with
`guestlib.connect`, waits for its VcpuStarted and reads the P2M (BootLayout); on a clean exit
it closes the Session, destroys the domain and checks that the machine audits clean.
`second_vcpu(guest, 1)` brings vCPU 1 up from vCPU 0 (VCPUOP_initialise + VCPUOP_up in one
message) and opens its Session in the same trio run, as a second vCPU process would.

`Exchanges` counts round trips: it wraps a client's `Session.exchange` (the real one still
sends every message to the server) and keeps each message's calls, stop_on_error flag and
response, so a test can check what went on the wire and how many messages a call cost.
"""

from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from guestlib import HypercallClient, Toolstack, connect, ops
from guestlib.layout import BootLayout
from guestlib.xen import PAGE_OFFSET, PAGE_SHIFT
from xensim.v1 import hypercalls_pb2, toolstack_pb2

from .layout import new_pgd

TIMEOUT = 30  # seconds for one test, server calls included
NR_PAGES = 2048
USER_VA = 0x400000  # nothing is mapped in the user half of the boot pagetables


@dataclass
class Message:
    """One Session message a client sent, and the server's answer to it."""

    calls: list[hypercalls_pb2.Call]
    stop_on_error: bool
    response: hypercalls_pb2.SessionResponse | None = None

    @property
    def kinds(self) -> list[str]:
        return [call.WhichOneof("call") for call in self.calls]


class Exchanges:
    """Every message `session` sends from now on, in order (see the module docstring)."""

    def __init__(self, session):
        self.messages: list[Message] = []
        real = session.exchange

        async def exchange(calls, stop_on_error: bool = False):
            message = Message(list(calls), stop_on_error)
            self.messages.append(message)
            message.response = await real(message.calls, stop_on_error)
            return message.response

        session.exchange = exchange

    def clear(self) -> None:
        self.messages.clear()


@dataclass
class Guest:
    """A booted domain: its toolstack, CreateDomainResponse, vCPU 0's client and layout."""

    address: str
    xl: Toolstack
    created: toolstack_pb2.CreateDomainResponse
    xen: HypercallClient
    layout: BootLayout
    sent: Exchanges = field(init=False)

    def __post_init__(self):
        self.sent = Exchanges(self.xen.session)

    @property
    def start_info(self):
        return self.created.start_info

    def page(self) -> int:
        """The direct-map VA of a fresh lowmem page (writable plain memory)."""
        return self.layout.direct_va(self.layout.alloc())

    def mfn_of(self, va: int) -> int:
        """The mfn behind a direct-map VA."""
        return self.layout.mfn((va - PAGE_OFFSET) >> PAGE_SHIFT)

    async def process_pgd(self) -> dict:
        """A process pgd (layout.new_pgd) filled and mapped read-only, as pgd_alloc leaves it
        before xen_pgd_pin: ready to pin as an L4. Returns new_pgd's dict."""
        kernel_l4 = await self.xen.read(self.start_info.pt_base, 4096)
        tree = new_pgd(self.layout, kernel_l4, USER_VA, self.layout.alloc())
        readonly = [self.layout.remap(pfn, False) for pfn in tree["pfns"]]
        filled, remapped = await self.xen.submit([ops.mmu_update(tree["fill"]), ops.mmu_update(readonly)], stop_on_error=True)
        assert (filled.result(), remapped.result()) == (len(tree["fill"]), 4)
        return tree


@asynccontextmanager
async def boot(server, nr_vcpus: int = 1, nr_pages: int = NR_PAGES):
    """A domain with vCPU 0 connected and started; destroyed and audited on a clean exit."""
    async with Toolstack(server.address, server.admin_token) as xl:
        created = await xl.create_domain(nr_pages=nr_pages, nr_vcpus=nr_vcpus)
        async with connect(server.address, created.token, 0) as xen:
            started = await xen.wait_started()
            assert started.start_info.pt_base_mfn == created.start_info.pt_base_mfn
            layout = await BootLayout.read(xen, created.start_info)
            yield Guest(server.address, xl, created, xen, layout)
        assert await xl.audit() == []
        assert await xl.destroy_domain(created.domid) == nr_pages + 1  # + shared info
        assert await xl.audit() == []


@asynccontextmanager
async def second_vcpu(guest: Guest, vcpu: int):
    """Bring `vcpu` up on the boot pagetables and yield its started client."""
    initialised, up = await guest.xen.submit([ops.vcpu_initialise(vcpu, guest.start_info.pt_base_mfn), ops.vcpu_up(vcpu)], stop_on_error=True)
    assert (initialised.result(), up.result()) == (None, None)
    async with connect(guest.address, guest.created.token, vcpu) as client:
        started = await client.wait_started()
        assert started.vcpu_id == vcpu
        yield client
