"""`xensim xl` over a real server: every command in text and --json, and its errors as one
line on stderr with the documented exit status.

The domain is put in the state every EBUSY of the unpin race comes from: its boot L4 unpinned
while vCPU 0 still runs on it, and a second L4 (sharing the boot kernel half) loaded on
vCPU 1. Making a frame of the boot tree writable then fails with EBUSY, and `who-maps` must
say why.
"""

import json
import re
import struct

import grpc
import pytest

from hypervisor.core.abi import VGCF_in_kernel
from tests.server.helpers import RW, US, A, D, P, WireGuest, error_info, status_of
from tests.support.server import start_server
from tests.test_timeline import CHROMIUM, CHROMIUM_TIMEOUT, chromium
from xensim.cli import main
from xensim.launch import run, xensim_command
from xensim.v1 import common_pb2, hypercalls_pb2, memory_pb2, toolstack_pb2
from xensim.xl import EXIT_AUTH, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, read_config

pytestmark = pytest.mark.timeout(120)
KERNEL_SLOT = 272  # PAGE_OFFSET's L4 slot


@pytest.fixture(scope="module")
def machine():
    with start_server(admin_token="xl-test-token") as server:
        guest = WireGuest(server, nr_pages=2048, nr_vcpus=2)
        boot = guest.start_info.pt_base_mfn
        kernel = guest.call("Load", memory_pb2.LoadRequest(va=guest.start_info.pt_base + 8 * KERNEL_SLOT, size=8)).value
        _, l4b = guest.pinned_table(4, {KERNEL_SLOT: kernel})
        context = hypercalls_pb2.VcpuGuestContext(flags=VGCF_in_kernel, kernel_cr3_mfn=l4b)
        guest.call("VcpuOp", hypercalls_pb2.VcpuOpRequest(vcpuid=1, initialise=hypercalls_pb2.VcpuInitialise(context=context)))
        guest.call("VcpuOp", hypercalls_pb2.VcpuOpRequest(vcpuid=1, up=hypercalls_pb2.VcpuUp()))
        guest.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, boot))
        port = guest.call("EventChannelOp", hypercalls_pb2.EventChannelOpRequest(bind_ipi=hypercalls_pb2.EvtchnBindIpi(vcpu=1))).port
        # The EBUSY: the boot L4 is still vCPU 0's base, so its frame cannot become writable.
        boot_pfn = (guest.start_info.pt_base - guest.start_info.page_offset) >> 12
        l1, slot = guest.direct_l1(boot_pfn)
        with pytest.raises(grpc.RpcError) as busy:
            guest.mmu_update(((l1 << 12) + 8 * slot, (boot << 12) | P | RW | US | A | D))
        assert error_info(status_of(busy.value)).reason == "EBUSY"
        yield {"server": server, "guest": guest, "boot": boot, "l4b": l4b, "kernel_l3": (kernel & ((1 << 52) - 1)) >> 12, "port": port, "direct_l1": l1}


def xl(machine, capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["xl", *argv, "--server", machine["server"].address, "--admin-token", "xl-test-token"])
    out, err = capsys.readouterr()
    return status, out, err


def xl_json(machine, capsys, *argv: str):
    status, out, err = xl(machine, capsys, *argv, "--json")
    assert status == 0, err
    return json.loads(out)


def test_list_and_list_long(machine, capsys):
    d = machine["guest"].domid
    status, out, _ = xl(machine, capsys, "list")
    assert status == 0 and re.search(rf"^dom{d}\s+{d}\s+2048\s+8\s+2/2\s+running\s+\d+$", out, re.M), out
    (record,) = xl_json(machine, capsys, "list", "-l")
    assert record["hypercalls"] >= 7  # the fixture's loads, mmu_updates, pin, vcpu_ops, unpin, bind
    assert record["shared_info_mfn"].startswith("0x") and record["vcpus_online"] == 2 and record["state"] == "running"
    assert "Shared-info" in xl(machine, capsys, "list", "-l")[1]


def test_info(machine, capsys):
    info = xl_json(machine, capsys, "info")
    assert info["total_frames"] == 1 << 16 and 0 < info["free_frames"] < info["total_frames"] and info["nr_domains"] == 1
    assert info["xen_version"].startswith("4.") and info["uptime_s"] > 0 and info["quarantined_frames"] == 0 and info["schedule"] == "free"
    assert "free_frames" in xl(machine, capsys, "info")[1]


def test_info_names_a_controlled_runs_schedule(capsys):
    with start_server("--schedule", "pct:7", admin_token="xl-test-token") as server:
        info = xl_json({"server": server}, capsys, "info")
        assert info["schedule"] == "pct:7:3" and info["uptime_s"] == 0  # virtual time: no step has run
        assert "pct:7:3" in xl({"server": server}, capsys, "info")[1]


def test_vcpu_list_shows_both_bases(machine, capsys):
    vcpus = xl_json(machine, capsys, "vcpu-list", str(machine["guest"].domid))
    assert [(v["vcpu"], v["kernel_cr3"], v["online"]) for v in vcpus] == [(0, hex(machine["boot"]), True), (1, hex(machine["l4b"]), True)]
    status, out, _ = xl(machine, capsys, "vcpu-list")
    assert status == 0 and hex(machine["l4b"]) in out


def test_who_maps_answers_the_ebusy(machine, capsys):
    found = xl_json(machine, capsys, "who-maps", hex(machine["boot"]))
    assert found["frame"]["type"] == "L4" and found["frame"]["type_count"] == 1 and not found["frame"]["pinned"]
    assert found["bases"] == [{"domid": machine["guest"].domid, "vcpu": 0, "base": "kernel"}]
    assert found["type_holders"] == {"pin": 0, "base pointers": 1, "pagetable entries": 0, "xen heap": 0}
    assert any(e["level"] == 1 and e["table"] == hex(machine["direct_l1"]) and "RW" not in e["flags"] for e in found["entries"])
    status, out, _ = xl(machine, capsys, "mfndump", "lookup-pte", hex(machine["boot"]))
    assert status == 0 and "kernel base pointer (cr3) of dom" in out and "vCPU 0" in out and "1 base pointers" in out


def test_who_maps_of_a_shared_kernel_table_lists_both_l4s(machine, capsys):
    found = xl_json(machine, capsys, "mfndump", "who-maps", hex(machine["kernel_l3"]))
    holders = {(e["table"], e["level"]) for e in found["entries"] if e["holds_reference"] and e["level"] > 1}
    assert holders == {(hex(machine["boot"]), 4), (hex(machine["l4b"]), 4)}  # and the direct map's read-only L1 entry
    assert found["type_holders"]["pagetable entries"] == 2 == found["frame"]["type_count"]


def test_dump_ptes(machine, capsys):
    table = xl_json(machine, capsys, "mfndump", "dump-ptes", hex(machine["l4b"]))
    assert table["level"] == 4 and table["frame"]["pinned"]
    slots = {e["slot"]: e for e in table["entries"]}
    assert slots[KERNEL_SLOT]["mfn"] == hex(machine["kernel_l3"]) and slots[KERNEL_SLOT]["target"]["type"] == "L3"
    assert slots[258]["xen_slot"]  # Xen's linear map
    status, out, _ = xl(machine, capsys, "mfndump", "dump-ptes", hex(machine["l4b"]))
    assert status == 0 and re.search(rf"\[272\] .* -> mfn {hex(machine['kernel_l3'])} pfn 0x[0-9a-f]+\s+L3 tc 2", out), out


def test_dump_p2m_and_m2p_agree(machine, capsys):
    d = machine["guest"].domid
    p2m = xl_json(machine, capsys, "mfndump", "dump-p2m", str(d))
    m2p = {e["mfn"]: e["pfn"] for e in xl_json(machine, capsys, "mfndump", "dump-m2p", str(d))}
    assert len(p2m) == 2048 and all(m2p[e["mfn"]] == e["pfn"] for e in p2m)
    assert xl(machine, capsys, "mfndump", "dump-p2m", str(d))[1].startswith("pfn 0x0 -> mfn 0x")


def test_lsevtchn_and_debug_keys(machine, capsys):
    d = machine["guest"].domid
    ports = xl_json(machine, capsys, "lsevtchn", str(d))
    assert {"domid": d, "port": machine["port"], "state": "ipi", "peer": None, "vcpu": 1, "pending": False, "masked": False} in ports
    assert "ipi" in xl(machine, capsys, "lsevtchn", str(d))[1]
    assert xl_json(machine, capsys, "debug-keys", "e") == ports
    q = xl_json(machine, capsys, "debug-keys", "q", str(d))
    assert q["pinned_pagetables"] == 1 and q["by_type"]["L4"] == 2 and q["writable_mappings"] > 0
    assert "1 pinned" in xl(machine, capsys, "debug-keys", "q", str(d))[1]


def test_create_pause_unpause_destroy(machine, capsys, tmp_path):
    cfg = tmp_path / "small.cfg"
    cfg.write_text('# an xl.cfg\nname = "small"\nmemory = 16\nvcpus = 2\nkernel = "/boot/vmlinuz"\n')
    created = xl_json(machine, capsys, "create", str(cfg), "--vcpus", "3")
    assert (created["name"], created["memory_mib"], created["vcpus"]) == ("small", 16, 3) and created["token"]
    domid = str(created["domid"])
    assert xl(machine, capsys, "pause", domid)[:2] == (0, f"dom{domid} paused\n")
    (paused,) = [d for d in xl_json(machine, capsys, "list") if d["domid"] == created["domid"]]
    assert paused["state"] == "paused" and paused["pages"] == 16 * 256
    assert xl_json(machine, capsys, "unpause", domid) == {"domid": created["domid"], "done": "unpaused"}
    status, out, _ = xl(machine, capsys, "destroy", domid)
    assert status == 0 and re.fullmatch(rf"dom{domid} destroyed, \d+ frames freed\n", out)


def test_read_config_rejects_a_malformed_line(tmp_path):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("memory = lots\n")
    with pytest.raises(Exception, match=r"bad.cfg:1: memory must be a whole number"):
        read_config(str(cfg))


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["lsevtchn", "99"], EXIT_REFUSED, r"ESRCH \(3\): .*99"),
        (["who-maps", "0xffffffff"], EXIT_REFUSED, r"EINVAL \(22\): mfn 0xffffffff is outside machine memory"),
        (["mfndump", "dump-ptes", "0x1"], EXIT_REFUSED, r"EINVAL \(22\): mfn 0x1 is not a pagetable"),
        (["debug-keys", "q"], EXIT_USAGE, r"debug-keys q needs a DOMID"),
        (["create", "/nonexistent.cfg"], EXIT_USAGE, r"cannot read /nonexistent.cfg"),
    ],
)
def test_errors_are_one_line_and_a_documented_status(machine, capsys, argv, status, message):
    got, out, err = xl(machine, capsys, *argv)
    assert got == status and out == "" and len(err.splitlines()) == 1 and re.search(message, err), err


def test_a_wrong_token_is_exit_4(machine, capsys):
    status = main(["xl", "list", "--server", machine["server"].address, "--admin-token", "wrong"])
    _, err = capsys.readouterr()
    assert status == EXIT_AUTH and err.startswith("xensim xl list: the hypervisor refused the admin token: wrong admin token")


def test_the_common_options_go_before_the_command_too(machine, capsys):
    status = main(["xl", "--server", machine["server"].address, "--admin-token", "xl-test-token", "--json", "info"])
    assert status == 0 and json.loads(capsys.readouterr().out)["nr_domains"] == 1


def test_the_token_file_is_read(machine, capsys, tmp_path):
    (tmp_path / "token").write_text("xl-test-token\n")
    status = main(["xl", "info", "--server", machine["server"].address, "--admin-token-file", str(tmp_path / "token")])
    assert status == 0 and "free_frames" in capsys.readouterr().out


def test_a_bad_mfn_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["xl", "who-maps", "0xzz"])
    assert e.value.code == EXIT_USAGE and "bad mfn '0xzz'" in capsys.readouterr().err


def test_no_server_is_exit_3_without_a_traceback():
    done = run(xensim_command("xl", "list", "--server", "127.0.0.1:1", "--timeout", "5"), timeout=60)
    assert done.returncode == EXIT_UNREACHABLE and done.stdout == ""
    assert done.stderr.splitlines() == ["xensim xl list: cannot reach the hypervisor at 127.0.0.1:1 (UNAVAILABLE); is `xensim serve` running there?"]


def test_top_samples_the_rates(machine, capsys):
    status, out, _ = xl(machine, capsys, "top", "--iterations", "2", "--interval", "0.2", "--json")
    samples = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [s["sample"] for s in samples] == [1, 2]
    assert {"domid": machine["guest"].domid, "op": "mmu_update", "outcome": "EBUSY", "per_s": 0.0, "total": 1} in samples[-1]["rows"]
    status, out, _ = xl(machine, capsys, "top", "--iterations", "1", "--interval", "0.1")
    assert status == 0 and "EBUSY" in out and "per s" in out


# -- pagetable pictures ---------------------------------------------------------------------

def draw(machine, capsys, tmp_path, *argv: str, out: str = "pt.svg") -> tuple[dict, str]:
    path = tmp_path / out
    data = xl_json(machine, capsys, "pagetable", str(machine["guest"].domid), *argv, "--svg" if out.endswith(".svg") else "--html", str(path))
    return data, path.read_text()


def test_pagetable_draws_a_shared_kernel_subtree_once_and_highlights_it_everywhere(machine, capsys, tmp_path):
    l3 = hex(machine["kernel_l3"])
    data, svg = draw(machine, capsys, tmp_path, "--highlight", l3)
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    assert {r["mfn"] for r in data["roots"]} == {hex(machine["boot"]), hex(machine["l4b"])}
    boxes = re.findall(r'<g class="table ([^"]*)" data-mfn="(0x[0-9a-f]+)"', svg)
    assert [m for _, m in boxes].count(l3) == 1 and len(boxes) == data["tables"] == len({m for _, m in boxes})
    classes = dict((m, c) for c, m in boxes)
    assert "pinned" in classes[hex(machine["l4b"])] and "pinned" not in classes[hex(machine["boot"])] and "hot" in classes[l3]
    assert len(re.findall(rf'<g class="edge rw hot" data-target="{l3}"', svg)) == 2  # from each L4
    # The direct map's read-only mapping of the L3 is in an L1 box.
    assert any(h["where"] == "mapping" and not h["writable"] for h in data["highlighted"])
    assert "maps-hot" in svg and f"maps {l3} at [" in svg


def test_pagetable_of_one_vcpu_and_of_a_given_table(machine, capsys, tmp_path):
    data, svg = draw(machine, capsys, tmp_path, "--cr3", "1")
    assert data["roots"] == [{"mfn": hex(machine["l4b"]), "label": "vCPU1 kernel"}] and hex(machine["boot"]) not in svg
    data, _ = draw(machine, capsys, tmp_path, "--mfn", hex(machine["kernel_l3"]))
    assert data["tables"] == 1 + 1 + 4  # the L3, its L2, the L2's four L1s


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["99"], EXIT_REFUSED, r"ESRCH"),
        (["1", "--cr3", "7"], EXIT_REFUSED, r"ENOENT"),
        (["1", "--cr3", "0", "--user"], EXIT_REFUSED, r"no vCPU has a user base pointer"),
        (["1", "--mfn", "0x1"], EXIT_REFUSED, r"EINVAL \(22\): mfn 0x1 is not a pagetable"),
    ],
)
def test_pagetable_errors(machine, capsys, tmp_path, argv, status, message):
    got, out, err = xl(machine, capsys, "pagetable", *argv, "--svg", str(tmp_path / "x.svg"))
    assert got == status and out == "" and len(err.splitlines()) == 1 and re.search(message, err), err


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
@pytest.mark.timeout(2 * CHROMIUM_TIMEOUT + 60)
def test_chromium_shows_the_picture_and_where_the_frame_appears(machine, capsys, tmp_path):
    l3 = hex(machine["kernel_l3"])
    _, page = draw(machine, capsys, tmp_path, "--highlight", l3, out="pt.html")
    assert re.findall(r"https?://[^\"'\s]+", page) == ["http://www.w3.org/2000/svg"] and "<link" not in page and " src=" not in page
    url = (tmp_path / "pt.html").as_uri()
    shot = tmp_path / "pt.png"
    chromium(f"--screenshot={shot}", url=url, profile=tmp_path / "profile")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1400, 900) and len(png) > 20_000
    dom = chromium("--dump-dom", url=url, profile=tmp_path / "profile").stdout
    # Filled in by the page's script: the two L4 entries, the L3 itself and its direct-map mapping.
    assert f"mfn {l3} appears in 4 places" in dom
    assert f"entry 272 of {hex(machine['boot'])} (RW)" in dom and f"entry 272 of {hex(machine['l4b'])} (RW)" in dom
    assert re.search(r"mapping \d+ of 0x[0-9a-f]+ \(read-only\)", dom)


def test_a_big_domains_m2p_is_past_grpcs_default_message_limit(capsys):
    with start_server(frames=1 << 20) as server:
        server.create_domain(nr_pages=600_000, nr_vcpus=1)  # its DumpM2P answer is ~7 MiB
        status = main(["xl", "--server", server.address, "--timeout", "120", "mfndump", "dump-m2p", "1", "--json"])
        out, err = capsys.readouterr()
    assert status == 0, err
    assert out.count('"pfn"') == 600_000 + 1  # and the shared-info frame


# -- every command, both forms, and each error as one line ----------------------------------

# Every read-only command; DOMID and MFN stand for the fixture's domain and its second L4.
READ_COMMANDS = [
    ["list"], ["list", "-l"], ["info"], ["vcpu-list"], ["vcpu-list", "DOMID"], ["lsevtchn", "DOMID"], ["debug-keys", "q", "DOMID"], ["debug-keys", "e"],
    ["mfndump", "dump-p2m", "DOMID"], ["mfndump", "dump-m2p"], ["mfndump", "dump-m2p", "DOMID"], ["mfndump", "dump-ptes", "MFN"], ["mfndump", "lookup-pte", "MFN"],
    ["mfndump", "who-maps", "MFN"], ["who-maps", "MFN"], ["top", "--iterations", "1", "--interval", "0.1"],
]  # fmt: skip
# Every command that names a domain, as it is given one that does not exist.
DOMAIN_COMMANDS = [
    ["vcpu-list", "99"], ["pause", "99"], ["unpause", "99"], ["destroy", "99"], ["lsevtchn", "99"], ["debug-keys", "q", "99"], ["debug-keys", "e", "99"],
    ["mfndump", "dump-p2m", "99"], ["mfndump", "dump-m2p", "99"], ["pagetable", "99", "--svg", "/dev/null"],
]  # fmt: skip
MFN_COMMANDS = [["mfndump", "dump-ptes"], ["mfndump", "lookup-pte"], ["mfndump", "who-maps"], ["who-maps"], ["pagetable", "1", "--svg", "/dev/null", "--mfn"]]


def _filled(machine, argv: list[str]) -> list[str]:
    return [str(machine["guest"].domid) if a == "DOMID" else hex(machine["l4b"]) if a == "MFN" else a for a in argv]


@pytest.mark.parametrize("argv", READ_COMMANDS, ids=" ".join)
def test_every_command_prints_text_and_json(machine, capsys, argv):
    argv = _filled(machine, argv)
    status, out, err = xl(machine, capsys, *argv)
    assert status == 0 and out.strip() and not err, err
    status, out, err = xl(machine, capsys, *argv, "--json")
    assert status == 0 and not err and json.loads(out.splitlines()[0] if argv[0] == "top" else out) is not None


@pytest.mark.parametrize("argv", DOMAIN_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("form", ["text", "json"])
def test_an_unknown_domain_is_one_line_and_exit_1(machine, capsys, argv, form):
    status, out, err = xl(machine, capsys, *argv, *(["--json"] if form == "json" else []))
    assert status == EXIT_REFUSED and out == "" and len(err.splitlines()) == 1 and re.search(r"ESRCH \(3\): .*\b99\b", err), err


@pytest.mark.parametrize("argv", MFN_COMMANDS, ids=" ".join)
def test_a_bad_mfn_is_one_line_for_every_command_that_takes_one(machine, capsys, argv):
    argv = [str(machine["guest"].domid) if a == "1" else a for a in argv]
    status, out, err = xl(machine, capsys, *argv, "0xffffffff")
    assert status == EXIT_REFUSED and out == "" and len(err.splitlines()) == 1 and "mfn 0xffffffff is outside machine memory" in err, err
    with pytest.raises(SystemExit) as usage:
        main(["xl", *argv, "0xzz"])
    assert usage.value.code == EXIT_USAGE and "bad mfn '0xzz'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [*READ_COMMANDS, *DOMAIN_COMMANDS, ["create", "--memory", "8"], ["pagetable", "1", "--svg", "/dev/null"]], ids=" ".join)
def test_every_command_without_a_server_is_one_line_and_exit_3(capsys, argv):
    argv = ["1" if a == "DOMID" else "0x1000" if a == "MFN" else a for a in argv]
    status = main(["xl", *argv, "--server", "127.0.0.1:1", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert status == EXIT_UNREACHABLE and out == "" and err.splitlines() == [f"xensim xl {_name(argv)}: cannot reach the hypervisor at 127.0.0.1:1 (UNAVAILABLE); is `xensim serve` running there?"]


def _name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] == "mfndump" else argv[0]


# -- a 32-bit PAE domain: three levels, a PAE L3 at the top and its pae_xen_l2 ------------------


@pytest.fixture(scope="module")
def pae_machine():
    """A server with one 32-bit domain as the builder left it: its boot PAE L3 pinned, the L2
    under slot 3 typed PGT_pae_xen_l2 (docs/pv32.md sections 3 and 4)."""
    with start_server(admin_token="xl-test-token") as server:
        guest = WireGuest(server, nr_pages=2048, nr_vcpus=1, address_size=32)
        l3 = guest.start_info.pt_base_mfn
        l2 = guest.toolstack("DumpPagetable", toolstack_pb2.DumpPagetableRequest(mfn=l3)).tables[0].entries[0].mfn
        yield {"server": server, "guest": guest, "l3": hex(l3), "l2": hex(l2)}


def test_create_of_a_32_bit_domain_names_its_boot_pae_l3(pae_machine, capsys, tmp_path):
    status, out, _ = xl(pae_machine, capsys, "create", "--address-size", "32")
    assert status == 0 and re.search(r"1 vCPUs, 32-bit, boot PAE L3 0x[0-9a-f]+$", out.splitlines()[0]), out
    config = tmp_path / "pae.cfg"
    config.write_text("name = pae\naddress_size = 32\n")
    created = xl_json(pae_machine, capsys, "create", str(config))
    assert (created["address_size"], created["pt_base_level"]) == (32, "PAE L3")
    assert "boot L4 0x" in xl(pae_machine, capsys, "create", str(config), "--address-size", "64", "--name", "wide")[1]
    sizes = {d["name"]: d["address_size"] for d in xl_json(pae_machine, capsys, "list", "-l")}
    assert (sizes["pae"], sizes["wide"]) == (32, 64) and re.search(r"^pae\s+\d+\s+2048\s+8\s+1/1\s+running\s+\d+\s+32\s", xl(pae_machine, capsys, "list", "-l")[1], re.M)
    config.write_text("address_size = 16\n")
    status, out, err = xl(pae_machine, capsys, "create", str(config))
    assert status == EXIT_USAGE and out == "" and err.strip().endswith("address_size must be 64 (x86-64) or 32 (PAE on the compat ABI), got 16"), err


def test_dump_ptes_and_who_maps_name_the_pae_l3_and_its_pae_xen_l2(pae_machine, capsys):
    l3, l2 = pae_machine["l3"], pae_machine["l2"]
    table = xl_json(pae_machine, capsys, "mfndump", "dump-ptes", l3)
    assert (table["name"], table["address_size"], [e["slot"] for e in table["entries"]]) == ("PAE L3", 32, [3])
    assert table["entries"][0]["target"]["pae_xen_l2"] and not table["frame"]["pae_xen_l2"]
    out = xl(pae_machine, capsys, "mfndump", "dump-ptes", l3)[1]
    assert out.startswith(f"PAE L3 mfn {l3} (dom") and f"-> mfn {l2} pfn 0x4  L2|PAE_XEN_L2 tc 1" in out, out
    out = xl(pae_machine, capsys, "mfndump", "dump-ptes", l2)[1]
    assert out.startswith(f"L2 mfn {l2} (dom") and ": type L2|PAE_XEN_L2, type count 1" in out and "(Xen slot)" in out.splitlines()[-1], out
    out = xl(pae_machine, capsys, "who-maps", l2)[1]
    assert f"PAE L3 entry 3 of mfn {l3} (dom" in out and "[holds a reference]" in out, out
    found = xl_json(pae_machine, capsys, "who-maps", l3)
    assert found["bases"] == [{"domid": pae_machine["guest"].domid, "vcpu": 0, "base": "kernel"}] and found["frame"]["type_count"] == 2  # the base and the builder's pin


def test_pagetable_of_a_32_bit_domain_draws_its_three_levels(pae_machine, capsys, tmp_path):
    l3, l2 = pae_machine["l3"], pae_machine["l2"]
    data, svg = draw(pae_machine, capsys, tmp_path)
    assert data["roots"] == [{"mfn": l3, "label": "vCPU0 kernel"}] and data["tables"] == 1 + 1 + 4  # the L3, its L2, four L1s
    assert re.findall(r'font-weight="bold">([^<]+)</text>', svg) == ["PAE L3", "L2", "L1"]  # no L4 column
    boxes = dict((m, c) for c, m in re.findall(r'<g class="table ([^"]*)" data-mfn="(0x[0-9a-f]+)"', svg))
    assert "pae-xen-l2" in boxes[l2] and "pae-xen-l2" not in boxes[l3] and "root" in boxes[l3]
    assert re.search(rf'data-mfn="{l3}"><title>[^<]*</title><rect x="30" ', svg)  # the leftmost column
    assert f">PAE L3 {l3}  [vCPU0 kernel]<" in svg and f">L2 {l2} pae_xen_l2<" in svg
    assert len(re.findall(rf'<g class="edge rw" data-target="{l2}"', svg)) == 1  # slot 3, adjusted with RW
