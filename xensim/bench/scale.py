"""Scale benchmarks: what the toolstack's operations cost as the machine, the domain and the
number of domains grow. Each should cost what its own request touches (issue 16): a view of
one domain or an audit of one domain nothing of the machine's size, a create or destroy the
frames of the domain, not those of the machine.

Three growth tables, each a row per size: machine frames 2^16..2^22 (one 16 MiB domain), the
domain's size 16 MiB..4 GiB (on a 16 GiB machine, 2^22 frames), and the number of 16 MiB
domains 1..256 (on a 16 GiB machine). Create, destroy, audit and the audit of one domain are
the core's, in this process (`Hypervisor.toolstack`, `audit`, `audit_domain`); ListDomains is
the real server's over gRPC, as a user sees it; guest boot is a real vCPU process booting the
guest and running one process lifecycle, refused if the guest hit a BUG or did no work.
Each figure is the median of a few runs (the first create of a large domain in a process
also pays for the memory the allocator maps anew; it is reported beside as `first_ms`); the
core's figures are CPU time of this process, ListDomains and boot are wall time.
"""

import statistics
import time

from hypervisor.core import Hypervisor, audit, audit_domain
from xensim.launch import create_domain, hypervisor_server, machine_frames, run_vcpus
from xensim.v1 import toolstack_pb2

MIB = 256  # pages of 4 KiB
MACHINE_SHIFTS = (16, 18, 20, 22)
DOMAIN_MIB = (16, 64, 256, 1024, 4096)
DOMAIN_COUNTS = (1, 4, 16, 64, 256)
BOOT_MIB = (16, 1024, 4096)
BOOT_KEYS = {"scale.boot_s_1gib": 1024, "scale.boot_s_4gib": 4096}
GIB_16 = 1 << 22  # frames
REPEAT = 3


def _ms(fn, repeat: int = REPEAT, clock=time.process_time) -> float:
    """The median of `repeat` timed calls of `fn`, in ms of `clock`. The core's
    work is timed in this process's CPU time, which other load on a shared machine does not
    inflate; what a user waits for (a call to the server) in wall time."""
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def _lifecycle(hv: Hypervisor, pages: int) -> dict:
    """Create, audit (whole and of the domain) and destroy a domain of `pages`, each timed."""
    created = []
    create_ms = _ms(lambda: created.append(hv.toolstack("create_domain", nr_pages=pages)["domid"]), 1)
    domid = created[0]
    audit_ms = _ms(lambda: _clean(audit(hv)), 1)
    one_ms = _ms(lambda: _clean(audit_domain(hv, domid)))
    destroy_ms = _ms(lambda: hv.toolstack("destroy_domain", domid=domid), 1)
    return {"create_ms": create_ms, "destroy_ms": destroy_ms, "audit_ms": audit_ms, "audit_one_domain_ms": one_ms}


def _clean(findings: list[str]) -> None:
    if findings:
        raise RuntimeError(f"the audit found {len(findings)} problems, first {findings[0]!r}: the figures would not time a sound machine")


def _median_rows(hv: Hypervisor, pages: int) -> dict:
    """`_lifecycle` REPEAT times on the same machine, each column's median."""
    runs = [_lifecycle(hv, pages) for _ in range(REPEAT)]
    row = {column: statistics.median(r[column] for r in runs) for column in runs[0]}
    row["first_create_ms"] = runs[0]["create_ms"]
    return row


def _by_machine() -> dict:
    return {f"2^{shift}": _median_rows(Hypervisor(nr_frames=1 << shift), 16 * MIB) for shift in MACHINE_SHIFTS}


def _by_domain_size() -> dict:
    hv = Hypervisor(nr_frames=GIB_16)
    return {f"{mib} MiB": _median_rows(hv, mib * MIB) for mib in DOMAIN_MIB}


def _by_domain_count() -> dict:
    """Domains of 16 MiB added up to each count: the audit of one and of the whole machine in
    this process, ListDomains over gRPC from a server holding as many."""
    hv = Hypervisor(nr_frames=GIB_16)
    rows = {}
    with hypervisor_server(frames=GIB_16) as server:
        stub, metadata = server.toolstack(), server.metadata()
        for count in DOMAIN_COUNTS:
            while len(hv.domains) < count:
                hv.toolstack("create_domain", nr_pages=16 * MIB)
                create_domain(server, nr_pages=16 * MIB, nr_vcpus=1)
            some = sorted(hv.domains)[:: max(1, count // 8)]
            one_ms = statistics.median(_ms(lambda d=d: _clean(audit_domain(hv, d)), 1) for d in some)
            list_ms = _ms(lambda n=count: _list_domains(stub, metadata, n), 11, time.perf_counter)
            rows[f"{count} domains"] = {"list_domains_ms": list_ms, "audit_one_domain_ms": one_ms, "audit_ms": _ms(lambda: _clean(audit(hv)), 1)}
    return rows


def _list_domains(stub, metadata, count: int) -> None:
    listed = len(stub.ListDomains(toolstack_pb2.ListDomainsRequest(), metadata=metadata, timeout=30).domains)
    if listed != count:
        raise RuntimeError(f"ListDomains listed {listed} domains, {count} exist")


def _boot() -> dict:
    """Seconds for a vCPU process to boot a guest of each size and run one process lifecycle
    (process start-up included), on a server with room for the largest."""
    rows = {}
    with hypervisor_server(frames=machine_frames(1, BOOT_MIB[-1] * MIB)) as server:
        stub, metadata = server.toolstack(), server.metadata()
        for mib in BOOT_MIB:
            domain = create_domain(server, nr_pages=mib * MIB, nr_vcpus=1)
            start = time.perf_counter()
            work = run_vcpus(server.address, domain.token, 1, "--lifecycles", "1")
            seconds = time.perf_counter() - start
            work.require_work(f"scale.boot_s_{mib}mib")
            stub.DestroyDomain(toolstack_pb2.DestroyDomainRequest(domid=domain.domid), metadata=metadata, timeout=60)
            rows[f"{mib} MiB"] = {"boot_and_one_lifecycle_s": seconds}
    return rows


def _table(rows: dict) -> list[str]:
    """The rows as printable lines, columns in the first row's order."""
    columns = list(next(iter(rows.values())))
    width = max(map(len, rows))
    return [f"{'':{width}}  " + "  ".join(f"{c:>20}" for c in columns)] + [
        f"{name:{width}}  " + "  ".join(f"{row[c]:>20.4g}" for c in columns) for name, row in rows.items()
    ]


def _growth(value: float, what: str, table: dict) -> dict:
    return {"value": value, "unit": "ratio", "what": what, "rows": _table(table), "table": table}


def run() -> dict:
    machine, size, count, boot = _by_machine(), _by_domain_size(), _by_domain_count(), _boot()
    top, most = size[f"{DOMAIN_MIB[-1]} MiB"], count[f"{DOMAIN_COUNTS[-1]} domains"]
    seconds = {mib: boot[f"{mib} MiB"]["boot_and_one_lifecycle_s"] for mib in BOOT_MIB}
    first, last = (f"2^{MACHINE_SHIFTS[i]}" for i in (0, -1))
    return {
        "scale.list_domains_ms_256_on_16gib": {"value": most["list_domains_ms"], "unit": "ms", "over": "gRPC, real server, wall time", "target": "<= 10"},
        "scale.audit_one_domain_ms_16mib_on_16gib": {"value": most["audit_one_domain_ms"], "unit": "ms", "domains": DOMAIN_COUNTS[-1], "target": "<= 5"},
        "scale.create_ms_4gib": {"value": top["create_ms"], "unit": "ms", "first_ms": top["first_create_ms"], "machine_frames": GIB_16, "target": "<= 150"},
        "scale.destroy_ms_4gib": {"value": top["destroy_ms"], "unit": "ms", "machine_frames": GIB_16},
        "scale.audit_ms_4gib": {"value": top["audit_ms"], "unit": "ms", "machine_frames": GIB_16},
        **{key: {"value": seconds[mib], "unit": "s", "includes": "process start-up and one lifecycle"} for key, mib in BOOT_KEYS.items()},
        "scale.by_machine_frames": _growth(machine[last]["audit_one_domain_ms"] / machine[first]["audit_one_domain_ms"], f"audit of one 16 MiB domain, {last} over {first} frames", machine),
        "scale.by_domain_size": _growth(top["create_ms"] / size[f"{DOMAIN_MIB[0]} MiB"]["create_ms"], "create, largest over smallest", size),
        "scale.by_domain_count": _growth(most["list_domains_ms"] / count[f"{DOMAIN_COUNTS[0]} domains"]["list_domains_ms"], "ListDomains, most domains over fewest", count),
        "scale.by_guest_size": _growth(seconds[BOOT_MIB[-1]] / seconds[BOOT_MIB[0]], "boot, largest over smallest", boot),
    }
