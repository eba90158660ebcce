"""`xensim toolstack`: the admin's side of a distributed run (xl's verbs), and token files.

`create` builds domains and writes one token file per domain into a directory: the shared
volume of docker-compose.yml, or a file copied to another host. A guest replica
(`xensim guest`) needs nothing else but the hypervisor's endpoint.
"""

import argparse
import json
import os
from pathlib import Path

import trio

from guestlib import Toolstack
from guestlib.paging import lowmem_pages
from hypervisor.server.config import ADMIN_TOKEN_ENV
from xensim.errors import address, address_sizes, at_least

TOKEN_FILES = "dom*.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", required=True, metavar="HOST:PORT", type=address, help="the hypervisor")
    common.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV), help=f"the hypervisor's admin token (default: ${ADMIN_TOKEN_ENV})")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", parents=[common], help="create domains and write one token file per domain")
    create.add_argument("--domains", type=at_least(1), default=1, help="how many domains")
    create.add_argument("--vcpus", type=at_least(1), default=4, help="vCPUs per domain")
    create.add_argument("--pages", type=at_least(1), default=8192, help="memory per domain in 4 KiB pages")
    create.add_argument("--highmem", type=at_least(0), metavar="PAGES", help="how many of the pages are highmem (default: none for a 64-bit domain, a 32-bit one's share above its direct map)")
    create.add_argument("--address-sizes", type=address_sizes, default=[64], metavar="SIZES", help="each domain's address size, cycled: 64, 32 (PAE, compat ABI), or a list: 32,64")
    create.add_argument("--out", required=True, metavar="DIR", help="where the token files go (stale ones are removed)")
    create.set_defaults(run=lambda args: _run(_create, args))
    destroy = sub.add_parser("destroy", parents=[common], help="destroy domains")
    destroy.add_argument("domids", type=at_least(0), nargs="+", metavar="DOMID", help="the domains to destroy")
    destroy.set_defaults(run=lambda args: _run(_destroy, args))
    audit = sub.add_parser("audit", parents=[common], help="audit the machine (or one domain); exit status 1 on any finding")
    audit.add_argument("--domid", type=at_least(0), help="audit only this domain")
    audit.set_defaults(run=lambda args: _run(_audit, args))
    listing = sub.add_parser("list", parents=[common], help="list the domains")
    listing.set_defaults(run=lambda args: _run(_list, args))
    detach = sub.add_parser("detach", parents=[common], help="end a vCPU's Session (its process hangs or its host is gone) so another process can claim the vCPU")
    detach.add_argument("domid", type=at_least(0), metavar="DOMID", help="the domain")
    detach.add_argument("vcpu", type=at_least(0), metavar="VCPU", help="the vCPU whose Session to end")
    detach.set_defaults(run=lambda args: _run(_detach, args))


def _run(action, args) -> int:
    """Run one verb (a refused call is xensim.errors' one line and exit status 1)."""
    return trio.run(action, Toolstack(args.server, args.admin_token), args)


async def _create(xl: Toolstack, args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(TOKEN_FILES):  # a volume outlives the hypervisor that issued them
        stale.unlink()
    async with xl:
        for i in range(args.domains):
            size = args.address_sizes[i % len(args.address_sizes)]
            highmem = args.highmem if args.highmem is not None else args.pages - lowmem_pages(size, args.pages)
            created = await xl.create_domain(nr_pages=args.pages, nr_vcpus=args.vcpus, highmem_pages=highmem, name=f"guest{i}", address_size=size)
            path = write_token_file(out, {"server": args.server, "domid": created.domid, "token": created.token, "nr_vcpus": args.vcpus, "nr_pages": args.pages})
            print(f"dom{created.domid}: {size}-bit, {args.vcpus} vCPUs, {args.pages} pages, token in {path}", flush=True)
    return 0


async def _destroy(xl: Toolstack, args) -> int:
    async with xl:
        for domid in args.domids:
            print(f"dom{domid}: destroyed, {await xl.destroy_domain(domid)} frames freed", flush=True)
    return 0


async def _audit(xl: Toolstack, args) -> int:
    async with xl:
        findings = await xl.audit(args.domid)
    for finding in findings:
        print(finding)
    print(f"{len(findings)} audit findings", flush=True)
    return 1 if findings else 0


async def _list(xl: Toolstack, args) -> int:
    async with xl:
        domains = await xl.list_domains()
    for d in domains:
        state = " paused" if d.paused else ""
        print(f"dom{d.domid} {d.name or '-'}: {d.online_vcpus}/{d.nr_vcpus} vCPUs up, {d.tot_pages}/{d.nr_pages} pages{state}")
    return 0


async def _detach(xl: Toolstack, args) -> int:
    async with xl:
        detached = await xl.detach_session(args.domid, args.vcpu)
    print(f"dom{args.domid} vCPU {args.vcpu}: {'Session detached' if detached else 'no Session was open'}", flush=True)
    return 0


def write_token_file(directory: Path, record: dict) -> Path:
    """dom<domid>.json, readable by its owner only (the token is the domain's credential),
    and renamed into place so a reader never sees half of it."""
    path = directory / f"dom{record['domid']}.json"
    partial = path.with_suffix(".partial")
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(record, f)
    os.replace(partial, path)
    return path


def read_token_files(directory: str) -> list[dict]:
    """Every domain's token file in `directory`, by domid."""
    return sorted((json.loads(p.read_text()) for p in Path(directory).glob(TOKEN_FILES)), key=lambda record: record["domid"])
