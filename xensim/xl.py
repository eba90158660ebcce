"""`xensim xl`: the commands a Xen user knows (xl, lsevtchn, xen-mfndump, xl debug-keys,
xentop) over a running hypervisor, answered by the Toolstack service's views.

Every command prints a table or a report for people, or with `--json` one JSON document for
programs; machine frame numbers and addresses are hex in both ("0x1fa0"), counts decimal.
The admin token comes from --admin-token, else --admin-token-file, else $XENSIM_ADMIN_TOKEN.

Exit status: 0 done; 1 the hypervisor refused (a Xen errno: ESRCH for an unknown domain,
EINVAL for a frame outside memory or not a pagetable); 2 a bad command line (argparse, a
malformed number, an unreadable config or token file); 3 the hypervisor cannot be reached
or did not answer within --timeout; 4 the admin token was refused. Every failure is one line on stderr.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc

from guestlib.toolstack import _rpc_error as rpc_error  # the Toolstack client's decoding of a failed call
from hypervisor.core.abi import INVALID_M2P, PAGE_SHIFT, Pte
from hypervisor.core.paging import MODES
from hypervisor.server.config import ADMIN_TOKEN_ENV
from xensim.v1 import common_pb2, toolstack_pb2, toolstack_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:50051"
EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH = 1, 2, 3, 4
PAGES_PER_MIB = (1 << 20) >> PAGE_SHIFT
MAX_RESPONSE = 256 << 20
_FLAGS = [(f.name, int(f)) for f in (Pte.PRESENT, Pte.RW, Pte.USER, Pte.PWT, Pte.PCD, Pte.ACCESSED, Pte.DIRTY, Pte.PSE, Pte.GLOBAL, Pte.NX)]
_SHORT = {"PRESENT": "P", "USER": "US", "ACCESSED": "A", "DIRTY": "D", "GLOBAL": "G"}


class Failed(Exception):
    """A command failed: the one line to print and the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# -- the connection -------------------------------------------------------------------------


class Xl:
    """A Toolstack stub that turns every failure into `Failed` with its exit status."""

    def __init__(self, server: str, token: str | None, timeout: float):
        self.server, self.timeout = server, timeout
        # A big domain's P2M or pagetable tree is several MiB, beyond grpc's default 4 MiB.
        self._channel = grpc.insecure_channel(server, options=(("grpc.max_receive_message_length", MAX_RESPONSE),))
        self._stub = toolstack_pb2_grpc.ToolstackStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __call__(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise Failed(f"cannot reach the hypervisor at {self.server} (UNAVAILABLE); is `xensim serve` running there?", EXIT_UNREACHABLE) from None
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise Failed(f"the hypervisor at {self.server} did not answer within {self.timeout:g} s (--timeout)", EXIT_UNREACHABLE) from None
            if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise Failed(f"the hypervisor refused the admin token: {e.details()} (give --admin-token, --admin-token-file or ${ADMIN_TOKEN_ENV})", EXIT_AUTH) from None
            error = rpc_error(e)
            raise Failed(str(error), EXIT_REFUSED) from None

    def close(self) -> None:
        self._channel.close()


def hexa(n: int | None) -> str | None:
    return None if n is None else f"{n:#x}"


def flag_names(entry: int) -> str:
    return "|".join(_SHORT.get(name, name) for name, bit in _FLAGS if entry & bit)


def type_name(value: int) -> str:
    return common_pb2.PageType.Name(value).removeprefix("PAGE_TYPE_")


def fields(message) -> dict:
    """A flat message's fields by name (an unset optional field as None)."""
    return {f.name: getattr(message, f.name) if not f.has_presence or message.HasField(f.name) else None for f in message.DESCRIPTOR.fields}


def frame_record(frame: toolstack_pb2.Frame | dict) -> dict:
    """A frame-table entry (a Frame message, or the core's `frame_info` dict) as the commands
    show it (mfn and M2P in hex)."""
    f = {**fields(frame), "type": type_name(frame.type)} if isinstance(frame, toolstack_pb2.Frame) else frame
    return {
        "mfn": hexa(f["mfn"]),
        "owner": f["owner"],
        "type": f["type"],
        "type_count": f["type_count"],
        "count": f["count"],
        "pinned": f["pinned"],
        "validated": f["validated"],
        "allocated": f["allocated"],
        "xen_heap": f["xen_heap"],
        "pae_xen_l2": f["pae_xen_l2"],
        "pfn": None if f["m2p"] == INVALID_M2P else hexa(f["m2p"]),
    }


def frame_type(f: dict) -> str:
    """A frame's type as Xen's messages name it, PGT_pae_xen_l2 included (docs/pv32.md section 3)."""
    return f["type"] + ("|PAE_XEN_L2" if f["pae_xen_l2"] else "")


def describe_frame(f: dict) -> str:
    owner = "free" if f["owner"] is None else f"dom{f['owner']}"
    state = ", ".join(s for s in ("pinned" if f["pinned"] else "not pinned", "validated" if f["validated"] else "", "xen heap" if f["xen_heap"] else "") if s)
    return f"mfn {f['mfn']} ({owner}, pfn {f['pfn'] or '-'}): type {frame_type(f)}, type count {f['type_count']}, count {f['count']}, {state}"


def yn(flag: bool) -> str:
    return "y" if flag else "-"


def table(rows: list[list], header: list[str]) -> str:
    """Left-aligned columns, as xl prints them."""
    cells = [header] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


# -- commands: each returns (data for --json, text for people) ------------------------------


def domain_record(d: toolstack_pb2.Domain, long: bool) -> dict:
    record = {
        "domid": d.domid,
        "name": d.name,
        "state": toolstack_pb2.DomainState.Name(d.state).removeprefix("DOMAIN_STATE_").lower(),
        "pages": d.tot_pages,
        "max_pages": d.nr_pages,
        "vcpus_online": d.online_vcpus,
        "vcpus": d.nr_vcpus,
    }
    if long:
        record |= {
            "address_size": d.address_size,
            "lowmem_pages": d.nr_lowmem_pages,
            "shared_info_mfn": hexa(d.shared_info_mfn),
            "max_evtchn_port": d.max_evtchn_port,
            "shutdown_reason": common_pb2.ShutdownReason.Name(d.shutdown_reason).removeprefix("SHUTDOWN_REASON_").lower() if d.HasField("shutdown_reason") else None,
        }
    return record


def domain_counts(xl, domid: int | None = None) -> dict[tuple[int, str, str], int]:
    """{(domid, op, errno name or "ok"): count} of the domains that exist (or of one)."""
    request = toolstack_pb2.DomainStatsRequest() if domid is None else toolstack_pb2.DomainStatsRequest(domid=domid)
    counts = xl("DomainStats", request).counts
    return {(c.domid, c.op, common_pb2.XenErrno.Name(c.errno).removeprefix("XEN_ERRNO_") if c.errno else "ok"): c.count for c in counts}


def cmd_list(xl: Xl, args) -> tuple:
    domains = [domain_record(d, args.long) for d in xl("ListDomains", toolstack_pb2.ListDomainsRequest()).domains]
    calls = Counter()
    for (domid, op, _), n in domain_counts(xl).items():
        if "/" not in op:  # "multicall/OP": a failed entry of a multicall, counted under "multicall" too
            calls[domid] += n
    for d in domains:
        d["hypercalls"] = calls[d["domid"]]
    header = ["Name", "ID", "Pages", "MiB", "vCPUs", "State", "Hypercalls"]
    rows = [[d["name"], d["domid"], d["pages"], d["pages"] // PAGES_PER_MIB, f"{d['vcpus_online']}/{d['vcpus']}", d["state"], d["hypercalls"]] for d in domains]
    if args.long:
        header += ["Bits", "Lowmem", "Shared-info", "Max port", "Shutdown"]
        for row, d in zip(rows, domains):
            row += [d["address_size"], d["lowmem_pages"], d["shared_info_mfn"], d["max_evtchn_port"], d["shutdown_reason"]]
    return domains, table(rows, header)


def cmd_info(xl: Xl, args) -> tuple:
    h = xl("HostInfo", toolstack_pb2.HostInfoRequest())
    info = {
        "host": h.simulator,
        "xen_version": h.xen_version,
        "total_frames": h.nr_frames,
        "free_frames": h.free_frames,
        "total_memory_mib": h.nr_frames // PAGES_PER_MIB,
        "free_memory_mib": h.free_frames // PAGES_PER_MIB,
        "nr_domains": h.nr_domains,
        "tlb_mode": "strict (a stale hit faults)" if h.strict_tlb else "lazy (stale hits counted)",
        "uptime_s": round(h.uptime_ns / 1e9, 3),
        "trace_file": "recording" if h.trace_file else "off",
        "trace_streams": h.trace_streams,
        "quarantined_frames": h.quarantined_frames,
        "schedule": h.schedule,
    }
    width = max(map(len, info))
    return info, "\n".join(f"{k.ljust(width)} : {v}" for k, v in info.items())


def _domids(xl: Xl, domid: int | None) -> list[int]:
    if domid is not None:
        return [domid]
    return [d.domid for d in xl("ListDomains", toolstack_pb2.ListDomainsRequest()).domains]


def cmd_vcpu_list(xl: Xl, args) -> tuple:
    vcpus = []
    for domid in _domids(xl, args.domid):
        for v in xl("VcpuInfo", toolstack_pb2.VcpuInfoRequest(domid=domid)).vcpus:
            vcpus.append(
                {
                    "domid": domid,
                    "vcpu": v.vcpu_id,
                    "online": v.online,
                    "blocked": v.blocked,
                    "kernel_cr3": hexa(v.kernel_cr3_mfn) if v.kernel_cr3_mfn else None,
                    "user_cr3": hexa(v.user_cr3_mfn) if v.user_cr3_mfn else None,
                    "upcall_pending": v.upcall_pending,
                    "upcall_mask": v.upcall_mask,
                    "tlb_entries": v.tlb_entries,
                    "stale_tlb_hits": v.stale_tlb_hits,
                    "session_open": v.session_open,
                }
            )
    rows = [
        [
            v["domid"],
            v["vcpu"],
            yn(v["online"]),
            yn(v["blocked"]),
            v["kernel_cr3"],
            v["user_cr3"],
            yn(v["upcall_pending"]),
            yn(v["upcall_mask"]),
            v["tlb_entries"],
            v["stale_tlb_hits"],
            yn(v["session_open"]),
        ]
        for v in vcpus
    ]
    return vcpus, table(rows, ["ID", "vCPU", "Up", "Blocked", "Kernel cr3", "User cr3", "Pending", "Masked", "TLB", "Stale hits", "Session"])


def _lifecycle(method: str, request: type, verb: str) -> Callable:
    def run(xl: Xl, args) -> tuple:
        response = xl(method, request(domid=args.domid))
        data = {"domid": args.domid, "done": verb}
        if method == "DestroyDomain":
            data["freed_frames"] = response.freed_frames
        return data, f"dom{args.domid} {verb}" + (f", {response.freed_frames} frames freed" if method == "DestroyDomain" else "")

    return run


def read_config(path: str) -> dict:
    """An xl.cfg-like file: `key = value` lines, # comments, values numbers or quoted strings.
    Only name, memory (MiB) and vcpus mean something here; other keys (kernel, disk, ...)
    are accepted and ignored, so a real xl.cfg can be used as it is."""
    config = {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise Failed(f"cannot read {path}: {e.strerror}", EXIT_USAGE) from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\w+)\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|(\S+))", line)
        if not match:
            raise Failed(f"{path}:{number}: expected `key = value`, got {line!r}", EXIT_USAGE)
        key, *quoted = match.groups()
        value = quoted[0] if quoted[0] is not None else quoted[1] if quoted[1] is not None else quoted[2]
        if key in ("memory", "vcpus", "address_size"):
            if not value.isdecimal():
                raise Failed(f"{path}:{number}: {key} must be a whole number, got {value!r}", EXIT_USAGE)
            value = int(value)
        config[key] = value
    return config


def cmd_create(xl: Xl, args) -> tuple:
    config = read_config(args.config) if args.config else {}
    name = args.name or config.get("name", "")
    memory = args.memory or config.get("memory", 8)
    vcpus = args.vcpus or config.get("vcpus", 1)
    address_size = args.address_size or config.get("address_size", 64)
    if address_size not in MODES:
        raise Failed(f"address_size must be 64 (x86-64) or 32 (PAE on the compat ABI), got {address_size}", EXIT_USAGE)
    created = xl("CreateDomain", toolstack_pb2.CreateDomainRequest(nr_pages=memory * PAGES_PER_MIB, nr_vcpus=vcpus, name=name, address_size=address_size))
    top = level_name(MODES[address_size].root, address_size)  # the table the builder pinned (docs/pv32.md section 4)
    data = {"domid": created.domid, "name": name, "memory_mib": memory, "vcpus": vcpus, "address_size": address_size, "token": created.token}
    data |= {"pt_base_mfn": hexa(created.start_info.pt_base_mfn), "pt_base_level": top}
    bits = "" if address_size == 64 else ", 32-bit"
    return data, f"dom{created.domid} created: {name or '-'}, {memory} MiB, {vcpus} vCPUs{bits}, boot {top} {data['pt_base_mfn']}\ndomain token: {created.token}"


_EVTCHN = {"UNBOUND": "unbound", "INTERDOMAIN": "interdomain", "PIRQ": "pirq", "VIRQ": "virq", "IPI": "ipi", "CLOSED": "closed"}


def _ports(xl: Xl, domid: int) -> list[dict]:
    ports = []
    for p in xl("EventChannelStatus", toolstack_pb2.EventChannelStatusRequest(domid=domid)).ports:
        state = _EVTCHN[common_pb2.EvtchnStat.Name(p.status.state).removeprefix("EVTCHN_STAT_")]
        peer = {"unbound": f"dom{p.status.remote_dom}", "interdomain": f"dom{p.status.remote_dom} port {p.status.remote_port}", "virq": f"VIRQ {p.status.virq}"}.get(state)
        ports.append({"domid": domid, "port": p.port, "state": state, "peer": peer, "vcpu": p.status.vcpu, "pending": p.pending, "masked": p.masked})
    return ports


def _port_table(ports: list[dict]) -> str:
    return table([[p["domid"], p["port"], p["state"], p["peer"], p["vcpu"], yn(p["pending"]), yn(p["masked"])] for p in ports], ["ID", "Port", "State", "Peer", "vCPU", "Pending", "Masked"])


def cmd_lsevtchn(xl: Xl, args) -> tuple:
    ports = _ports(xl, args.domid)
    return ports, _port_table(ports)


def cmd_debug_keys(xl: Xl, args) -> tuple:
    if args.key == "e":
        ports = [p for domid in _domids(xl, args.domid) for p in _ports(xl, domid)]
        return ports, _port_table(ports)
    if args.domid is None:
        raise Failed("debug-keys q needs a DOMID", EXIT_USAGE)
    s = xl("DomainSummary", toolstack_pb2.DomainSummaryRequest(domid=args.domid))
    data = {
        "domid": args.domid,
        "frames": s.frames,
        "by_type": {type_name(t.type): t.count for t in s.by_type},
        "pagetables": s.pagetables,
        "validated_pagetables": s.validated_pagetables,
        "pinned_pagetables": s.pinned_pagetables,
        "writable_mappings": s.writable_mappings,
        "writable_frames": s.writable_frames,
    }
    types = ", ".join(f"{t} {n}" for t, n in data["by_type"].items())
    text = (
        f"dom{args.domid}: {s.frames} frames ({types})\n"
        f"  pagetables: {s.pagetables}, {s.validated_pagetables} validated, {s.pinned_pagetables} pinned\n"
        f"  writable mappings: {s.writable_mappings} on {s.writable_frames} frames"
    )
    return data, text


def cmd_dump_p2m(xl: Xl, args) -> tuple:
    mfns = xl("DumpP2M", toolstack_pb2.DumpP2MRequest(domid=args.domid)).mfns
    data = [{"pfn": hexa(pfn), "mfn": hexa(mfn)} for pfn, mfn in enumerate(mfns)]
    return data, "\n".join(f"pfn {d['pfn']} -> mfn {d['mfn']}" for d in data)


def cmd_dump_m2p(xl: Xl, args) -> tuple:
    request = toolstack_pb2.DumpM2PRequest() if args.domid is None else toolstack_pb2.DumpM2PRequest(domid=args.domid)
    entries = xl("DumpM2P", request).entries
    data = [{"mfn": hexa(e.mfn), "owner": e.owner, "pfn": None if e.pfn == INVALID_M2P else hexa(e.pfn)} for e in entries]
    return data, "\n".join(f"mfn {d['mfn']} -> pfn {d['pfn'] or 'INVALID'} (dom{d['owner']})" for d in data)


def entry_record(e: toolstack_pb2.PagetableEntry) -> dict:
    return {
        "slot": e.slot,
        "entry": hexa(e.entry),
        "flags": flag_names(e.entry),
        "mfn": hexa(e.mfn),
        "pfn": hexa(e.pfn) if e.HasField("pfn") else None,
        "target": frame_record(e.target) if e.HasField("target") else None,
        "xen_slot": e.xen_slot,
    }


def level_name(level: int, address_size: int) -> str:
    """A table's level as a reader knows it: a 32-bit domain's top level is a PAE L3
    (docs/pv32.md section 2); every other level is Ln."""
    return "PAE L3" if address_size == 32 and level == 3 else f"L{level}"


def pagetable_record(t: toolstack_pb2.PagetableFrame) -> dict:
    return {"level": t.level, "name": level_name(t.level, t.address_size), "address_size": t.address_size, "frame": frame_record(t.frame), "entries": [entry_record(e) for e in t.entries]}


def cmd_dump_ptes(xl: Xl, args) -> tuple:
    (t,) = xl("DumpPagetable", toolstack_pb2.DumpPagetableRequest(mfn=args.mfn)).tables
    data = pagetable_record(t)
    lines = [f"{data['name']} {describe_frame(data['frame'])}; {len(data['entries'])} present entries"]
    for e in data["entries"]:
        target = e["target"]
        what = f"{frame_type(target)} tc {target['type_count']} c {target['count']}{' pinned' if target['pinned'] else ''}" if target else "outside memory"
        lines.append(f"  [{e['slot']:3}] {e['entry']:>18}  {e['flags']:<24} -> mfn {e['mfn']} pfn {e['pfn'] or '-'}  {what}{'  (Xen slot)' if e['xen_slot'] else ''}")
    return data, "\n".join(lines)


def cmd_who_maps(xl: Xl, args) -> tuple:
    found = xl("ReverseMap", toolstack_pb2.ReverseMapRequest(mfn=args.mfn))
    return who_maps(frame_record(found.frame), [fields(e) for e in found.entries], [fields(b) for b in found.bases])


def who_maps(frame: dict, references: list[dict], base_pointers: list[dict]) -> tuple[dict, str]:
    """The who-maps report of a frame (`frame_record`) from the ReverseMap's references and
    base pointers (as the core's `views.reverse_map` gives them, or its message's fields)."""
    entries = [
        {
            "table": hexa(e["table"]),
            "level": e["level"],
            "slot": e["slot"],
            "entry": hexa(e["entry"]),
            "flags": flag_names(e["entry"]),
            "owner": e["owner"],
            "holds_reference": e["holds_reference"],
            "xen_slot": e["xen_slot"],
            "address_size": e["address_size"],
        }
        for e in references
    ]
    bases = [{"domid": b["domid"], "vcpu": b["vcpu"], "base": "user" if b["user"] else "kernel"} for b in base_pointers]
    data = {"frame": frame, "entries": entries, "bases": bases, "type_holders": type_holders(frame, entries, bases)}
    lines = [describe_frame(frame)]
    held = data["type_holders"]
    lines.append(f"  type references: {frame['type_count']}, held by " + ", ".join(f"{n} {what}" for what, n in held.items()))
    for b in bases:
        lines.append(f"  {b['base']} base pointer (cr3) of dom{b['domid']} vCPU {b['vcpu']}")
    for e in entries:
        note = "holds a reference" if e["holds_reference"] else "Xen's slot, no reference" if e["xen_slot"] else "table not in use, no reference"
        lines.append(f"  {level_name(e['level'], e['address_size'])} entry {e['slot']} of mfn {e['table']} (dom{e['owner']}): {e['entry']} {e['flags']}  [{note}]")
    if not bases and not entries:
        lines.append("  no pagetable entry and no base pointer refers to it")
    return data, "\n".join(lines)


def type_holders(frame: dict, entries: list[dict], bases: list[dict]) -> dict:
    """Who holds the frame's type references, the holder table Xen's counts follow (pins and
    base pointers hold the top level's type, an L4 or a 32-bit domain's PAE L3; an upper-level
    entry its target's type, a writable L1 entry WRITABLE, a Xen-heap page one permanent
    WRITABLE): a reader compares the sum with the type count to see whether anything else (a
    bug) holds one."""
    typed = [e for e in entries if e["holds_reference"] and (e["level"] > 1 or "RW" in e["flags"].split("|"))]
    return {"pin": int(frame["pinned"]), "base pointers": len(bases), "pagetable entries": len(typed), "xen heap": int(frame["xen_heap"])}


def mfn_arg(text: str) -> int:
    """An mfn as the messages print it (0x1fa0) or decimal."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad mfn {text!r}: expected a number like 0x1fa0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"bad mfn {text!r}: negative")
    return value


# -- the command line -----------------------------------------------------------------------


def _token(args) -> str | None:
    if args.admin_token:
        return args.admin_token
    if args.admin_token_file:
        try:
            return Path(args.admin_token_file).read_text().strip()
        except OSError as e:
            raise Failed(f"cannot read {args.admin_token_file}: {e.strerror}", EXIT_USAGE) from None
    return os.environ.get(ADMIN_TOKEN_ENV)


def run(args) -> int:
    """Run one xl command: its output on stdout, or one line on stderr and a non-zero status."""
    xl = None
    try:
        xl = Xl(args.server, _token(args), args.timeout)
        data, text = args.xl_run(xl, args)
    except Failed as e:
        print(f"xensim xl {args.xl}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    finally:
        if xl is not None:
            xl.close()
    if text is not None:  # None: the command printed as it went (top)
        print(json.dumps(data, indent=2) if args.json else text)
    return 0


def _options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before the command (with their defaults) or after
    it (where a default would overwrite the value given before, so there are none)."""
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--server", default=default(DEFAULT_SERVER), metavar="HOST:PORT", help=f"the hypervisor (default {DEFAULT_SERVER})")
    parser.add_argument("--admin-token", default=default(None), metavar="TOKEN", help=f"the hypervisor's admin token (default: --admin-token-file, else ${ADMIN_TOKEN_ENV})")
    parser.add_argument("--admin-token-file", default=default(None), metavar="FILE", help="read the admin token from FILE")
    parser.add_argument("--json", action="store_true", default=default(False), help="print one JSON document instead of text")
    parser.add_argument("--timeout", type=float, default=default(10.0), metavar="S", help="give up on a call after S seconds (default 10)")


MFN_HELP = "the machine frame, hex (0x1fa0) or decimal"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _options(common, defaults=False)
    sub = parser.add_subparsers(dest="xl", required=True, metavar="COMMAND")

    def command(name: str, runner: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help)
        p.set_defaults(run=run, xl_run=runner, xl=name)
        return p

    listing = command("list", cmd_list, "the domains: pages, vCPUs up/total, state (running, blocked, paused, shutdown; never dying: destroy is one call)")
    listing.add_argument("-l", "--long", action="store_true", help="also lowmem, shared-info frame, event-channel limit, shutdown reason")
    command("info", cmd_info, "the machine: frames total, free and quarantined, domains, version, TLB mode, uptime, trace, schedule")
    vcpus = command("vcpu-list", cmd_vcpu_list, "vCPUs: up, blocked, kernel/user cr3, upcall pending/mask, TLB, stale-TLB hits")
    vcpus.add_argument("domid", type=int, nargs="?", metavar="DOMID", help="one domain (default: all)")
    for name, method, request, verb in (
        ("pause", "PauseDomain", toolstack_pb2.PauseDomainRequest, "paused"),
        ("unpause", "UnpauseDomain", toolstack_pb2.UnpauseDomainRequest, "unpaused"),
        ("destroy", "DestroyDomain", toolstack_pb2.DestroyDomainRequest, "destroyed"),
    ):
        command(name, _lifecycle(method, request, verb), f"{name} a domain").add_argument("domid", type=int, metavar="DOMID", help="the domain")
    create = command("create", cmd_create, "build a domain from an xl.cfg-like file and/or options; prints its token")
    create.add_argument("config", nargs="?", metavar="CFG", help="a file of `key = value` lines: name, memory (MiB), vcpus, address_size")
    create.add_argument("--name", help="overrides the file's name")
    create.add_argument("--memory", type=int, metavar="MIB", help="overrides the file's memory (default 8)")
    create.add_argument("--vcpus", type=int, metavar="N", help="overrides the file's vcpus (default 1)")
    create.add_argument("--address-size", type=int, choices=tuple(MODES), help="overrides the file's address_size: 64 (x86-64, default) or 32 (PAE on the compat ABI)")
    command("lsevtchn", cmd_lsevtchn, "a domain's event channels: port, state, peer, vCPU, pending, masked").add_argument("domid", type=int, metavar="DOMID", help="the domain")
    keys = command("debug-keys", cmd_debug_keys, "q DOMID: a domain's frames by type, pinned and validated tables, writable mappings; e: every port")
    keys.add_argument("key", choices=("q", "e"), help="q: a domain's frame-table summary; e: event channels of every domain")
    keys.add_argument("domid", type=int, nargs="?", metavar="DOMID", help="the domain (for q)")

    mfndump = sub.add_parser("mfndump", help="xen-mfndump: dump-p2m, dump-m2p, dump-ptes, lookup-pte (who-maps)")
    mfn_sub = mfndump.add_subparsers(dest="mfndump", required=True, metavar="COMMAND")

    def mfn_command(name: str, runner: Callable, help: str) -> argparse.ArgumentParser:
        p = mfn_sub.add_parser(name, parents=[common], help=help)
        p.set_defaults(run=run, xl_run=runner, xl=f"mfndump {name}")
        return p

    mfn_command("dump-p2m", cmd_dump_p2m, "a domain's pfn -> mfn map").add_argument("domid", type=int, metavar="DOMID", help="the domain")
    mfn_command("dump-m2p", cmd_dump_m2p, "mfn -> pfn of every owned frame (or one domain's)").add_argument("domid", type=int, nargs="?", metavar="DOMID", help="one domain (default: all)")
    mfn_command("dump-ptes", cmd_dump_ptes, "a pagetable frame's entries decoded, with each target's type and counts").add_argument("mfn", type=mfn_arg, metavar="MFN", help=MFN_HELP)
    for name in ("lookup-pte", "who-maps"):  # two parsers, not an alias, so that an error names the one typed
        mfn_command(name, cmd_who_maps, "every entry and base pointer that refers to a frame").add_argument("mfn", type=mfn_arg, metavar="MFN", help=MFN_HELP)
    command("who-maps", cmd_who_maps, "every pagetable entry, vCPU base pointer and pin that holds a frame (the answer to an EBUSY)").add_argument("mfn", type=mfn_arg, metavar="MFN", help=MFN_HELP)

    from xensim import pagetable_view  # it imports this module

    pagetable_view.add_arguments(command("pagetable", _pagetable, "draw the pagetable tree under a base pointer as a self-contained HTML or SVG picture"))
    top = command("top", _top, "each domain's hypercall rates by op and errno, refreshed live (like xentop)")
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between samples (default %(default)s)")
    top.add_argument("--iterations", type=int, metavar="N", help="stop after N samples (default: until interrupted)")


def _pagetable(xl: Xl, args) -> tuple:
    from xensim.pagetable_view import cmd_pagetable

    return cmd_pagetable(xl, args)


def _top(xl: Xl, args) -> tuple:
    from xensim.xl_top import cmd_top

    return cmd_top(xl, args)
