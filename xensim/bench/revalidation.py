"""Load: another domain's round trip while one guest keeps Xen re-validating its pagetable.

The attack of issue 10 (part 3): a 256 MiB guest sends one legal MmuextOp of 2,048
[PIN_L4_TABLE, UNPIN_TABLE] pairs on its own boot pagetable, so that every pin validates the
whole tree (65,536 L1 entries and the tables above them) and every unpin devalidates it again,
and sends it again as soon as it is answered. A small victim domain meanwhile makes XenVersion
round trips, as it did a moment before on the idle server; both p99s are reported side by side.

The attacker needs no guest kernel: the builder's boot tree is the tree, and the client only
moves its vCPU to an empty L4 and unpins the boot L4 first, so that nothing else holds it.
Victim and attacker are two Sessions of one trio client process, so the client's own scheduling
is the same in both phases.
"""

import time

import trio

from guestlib import Toolstack, connect
from guestlib.layout import BootLayout
from guestlib.xen import MmuextCmd
from xensim.launch import hypervisor_server

SECONDS = 10.0
ATTACKER_PAGES = 65536  # 256 MiB
VICTIM_PAGES = 1024
PAIRS = 2048  # [PIN_L4_TABLE, UNPIN_TABLE] per call: the MAX_BATCH of 4,096 ops
SERVER_FRAMES = 1 << 18
TARGET_US = 50_000


async def _round_trips(xen, seconds: float) -> list[int]:
    """XenVersion round trips (us) for `seconds`."""
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter_ns()
        await xen.xen_version()
        latencies.append((time.perf_counter_ns() - start) // 1000)
    return latencies


async def _attack(xen, info, sending: trio.Event, calls: list[int]) -> None:
    """Free the boot tree of every holder but this loop, then pin and unpin it until cancelled."""
    await xen.wait_started()
    layout = await BootLayout.read(xen, info)
    empty = layout.alloc()
    await xen.mmu_update([layout.remap(empty, False)])
    await xen.mmuext_op([(MmuextCmd.NEW_BASEPTR, layout.mfn(empty)), (MmuextCmd.UNPIN_TABLE, info.pt_base_mfn)])
    attack = [(MmuextCmd.PIN_L4_TABLE, info.pt_base_mfn), (MmuextCmd.UNPIN_TABLE, info.pt_base_mfn)] * PAIRS
    sending.set()
    while True:
        await xen.mmuext_op(attack)
        calls[0] += 1


async def _measure(address: str, seconds: float) -> dict:
    """The victim's round trips on the idle server, then with the attack under way. The
    victim's Session is open before either, so nothing but the calls themselves is timed."""
    async with Toolstack(address) as xl:
        created = [await xl.create_domain(nr_pages=n, nr_vcpus=1, name=name) for n, name in ((VICTIM_PAGES, "victim"), (ATTACKER_PAGES, "attacker"))]
        calls = [0]
        async with connect(address, created[0].token, 0) as victim, connect(address, created[1].token, 0) as attacker:
            await victim.wait_started()
            idle = await _round_trips(victim, seconds)
            async with trio.open_nursery() as nursery:
                sending = trio.Event()
                nursery.start_soon(_attack, attacker, created[1].start_info, sending, calls)
                await sending.wait()
                await trio.sleep(0.5)  # the attack call is under way in the server
                loaded = await _round_trips(victim, seconds)
                nursery.cancel_scope.cancel()
        for domain in created:
            await xl.destroy_domain(domain.domid)
        findings = await xl.audit()
    if findings:
        raise RuntimeError(f"the attack left the hypervisor inconsistent: {findings[:5]}")
    return {"idle": sorted(idle), "loaded": sorted(loaded), "attack_calls": calls[0]}


def _p99(latencies: list[int]) -> int:
    return latencies[int(0.99 * (len(latencies) - 1))]


def measure(seconds: float = SECONDS) -> dict:
    with hypervisor_server(frames=SERVER_FRAMES) as server:
        return trio.run(_measure, server.address, seconds)


def summary(run: dict, seconds: float = SECONDS) -> dict:
    idle, loaded = run["idle"], run["loaded"]
    context = {
        "seconds": seconds,
        "victim": f"XenVersion round trips of a {VICTIM_PAGES}-page domain, one Session",
        "attack": f"MmuextOp of {PAIRS} [PIN_L4_TABLE, UNPIN_TABLE] pairs on the boot L4 of a {ATTACKER_PAGES}-page domain, again and again",
        "attack_calls_completed": run["attack_calls"],
        "idle_p99_us": _p99(idle),
        "idle_round_trips": len(idle),
        "loaded_round_trips": len(loaded),
        "loaded_p50_us": loaded[len(loaded) // 2],
        "loaded_max_us": loaded[-1],
    }
    return {
        "load.victim_p99_us_idle": {"value": _p99(idle), "unit": "us", **context},
        "load.victim_p99_us_under_revalidation": {"value": _p99(loaded), "unit": "us", "target": f"<= {TARGET_US}", **context},
    }


def run() -> dict:
    return summary(measure())


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
