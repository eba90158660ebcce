"""docker-compose.yml's topology as plain processes on loopback: the commands of its
services, with the hypervisor's name and the tokens volume replaced by the test's server and a
temporary directory, and nothing shared between the guest replicas but the endpoint and the
token files."""

import json
import os
import re
import signal
import stat
import subprocess
import time
from contextlib import AsyncExitStack, ExitStack

import pytest
import trio

from guestlib import connect
from guestlib.hypercalls import claim
from tests.support.processes import alive, children
from xensim import launch
from xensim.launch import xensim_command
from xensim.toolstack import read_token_files

from .compose import command, healthcheck

pytestmark = pytest.mark.timeout(240)
TIMEOUT = 180.0
SMALL_RUN = {"XENSIM_DOMAINS": "1", "XENSIM_VCPUS": "4", "XENSIM_PAGES": "8192", "XENSIM_VCPUS_PER_REPLICA": "2", "XENSIM_SECONDS": "3"}


def on_loopback(argv: list[str], server, tokens) -> list[str]:
    """A compose command as a local process: compose's addresses become the test server's."""
    local = {"hypervisor:50051": server.address, "127.0.0.1:50051": server.address, "/tokens": str(tokens)}
    return xensim_command(*(local.get(arg, arg) for arg in argv))


def guest_env() -> dict[str, str]:
    """A guest replica's environment: no admin token, as in docker-compose.yml."""
    return {k: v for k, v in os.environ.items() if k != "XENSIM_ADMIN_TOKEN"}


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return launch.run(argv, timeout=TIMEOUT, env=env or guest_env())


def create_domains(server, tokens) -> list[dict]:
    """The toolstack service: `xensim toolstack create` once the health check passes."""
    health = run(on_loopback(healthcheck("hypervisor"), server, tokens))
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    admin = {**guest_env(), "XENSIM_ADMIN_TOKEN": server.admin_token}
    created = run(on_loopback(command("toolstack", SMALL_RUN), server, tokens), env=admin)
    assert created.returncode == 0, created.stdout + created.stderr
    return read_token_files(tokens)


def summary(stdout: str) -> dict:
    """A replica's last line: {"ran": [{"domid", "vcpu"}...], "unclaimed", "lifecycles", "failures"}."""
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_replicas_share_out_a_domains_vcpus_and_each_vcpu_runs_once(secure_server, tmp_path):
    (domain,) = create_domains(secure_server, tmp_path)
    assert (domain["nr_vcpus"], domain["server"]) == (4, secure_server.address)
    assert stat.S_IMODE((tmp_path / f"dom{domain['domid']}.json").stat().st_mode) == 0o600

    argv = on_loopback([*command("guest", SMALL_RUN), "--progress", "1"], secure_server, tmp_path)
    with ExitStack() as stack:
        replicas = [stack.enter_context(launch.started(argv, env=guest_env())) for _ in range(2)]
        outputs = [replica.finish(TIMEOUT) for replica in replicas]
    for replica, out in zip(replicas, outputs):
        assert replica.process.returncode == 0, out + replica.log()
    summaries = [summary(out) for out in outputs]
    for out in outputs:  # progress as it runs, then a summary and a verdict beside the JSON
        lines = out.splitlines()
        assert re.match(r" *\d+\.\d/3 s: \d+ process exits, 2/2 vCPU processes running$", lines[0]), out
        assert re.match(r"\d+ process lifecycles in [\d.]+ s; seed \d+$", lines[-5]) and lines[-2] == "verdict: OK", out
        assert lines[-4].startswith("  ran        dom") and lines[-3] == "  unclaimed  0", out
    assert [len(s["ran"]) for s in summaries] == [2, 2]
    ran = sorted((r["domid"], r["vcpu"]) for s in summaries for r in s["ran"])
    assert ran == [(domain["domid"], v) for v in range(4)]
    assert all(s["failures"] == [] and s["unclaimed"] == 0 and s["lifecycles"] > 0 for s in summaries)
    assert summaries[0]["seed"] != summaries[1]["seed"]  # each replica its own workload

    admin = {**guest_env(), "XENSIM_ADMIN_TOKEN": secure_server.admin_token}
    audit = run(on_loopback(["toolstack", "audit", "--server", "hypervisor:50051"], secure_server, tmp_path), env=admin)
    assert (audit.returncode, audit.stdout.strip()) == (0, "0 audit findings")


async def test_a_replica_finds_nothing_to_claim_when_every_vcpu_has_a_process(secure_server, tmp_path):
    """Every vCPU's Session is held here; the replica's vCPU process tries each (ALREADY_EXISTS),
    stops at the id past the last (INVALID_ARGUMENT), and the replica exits 0 having run none."""
    (domain,) = create_domains(secure_server, tmp_path)
    async with AsyncExitStack() as held:
        for vcpu in range(domain["nr_vcpus"]):
            client = await held.enter_async_context(connect(secure_server.address, domain["token"], vcpu))
            await client.echo()
        argv = on_loopback([*command("guest", SMALL_RUN), "--vcpus-per-replica", "1"], secure_server, tmp_path)
        with trio.fail_after(TIMEOUT):
            replica = await launch.run_async(argv, env=guest_env())
    out = replica.stdout
    assert replica.returncode == 0, out + replica.stderr
    assert summary(out) | {"seed": None} == {"seed": None, "ran": [], "unclaimed": 1, "lifecycles": 0, "failures": []}



async def test_toolstack_detach_frees_a_held_vcpu_for_the_next_claim(secure_server, tmp_path):
    """A vCPU held by a process that hangs (here, this test holds every one) is what the next
    claim gets once `xensim toolstack detach` has ended its Session."""
    (domain,) = create_domains(secure_server, tmp_path)
    admin = {**guest_env(), "XENSIM_ADMIN_TOKEN": secure_server.admin_token}
    detach = on_loopback(["toolstack", "detach", "--server", "hypervisor:50051", str(domain["domid"]), "2"], secure_server, tmp_path)
    async with AsyncExitStack() as held:
        for vcpu in range(domain["nr_vcpus"]):
            client = await held.enter_async_context(connect(secure_server.address, domain["token"], vcpu))
            await client.echo()
        with trio.fail_after(TIMEOUT):
            detached = await launch.run_async(detach, env=admin)
            async with claim(secure_server.address, [domain["token"]]) as claimed:
                assert claimed is not None and claimed[:2] == (0, 2)
    assert (detached.returncode, detached.stdout.strip()) == (0, f"dom{domain['domid']} vCPU 2: Session detached"), detached.stderr



def test_sigterm_stops_a_replica_and_its_vcpu_processes(secure_server, tmp_path):
    """`docker compose down` sends SIGTERM: the replica stops its vCPU processes and exits 143."""
    create_domains(secure_server, tmp_path)
    argv = on_loopback([*command("guest", {**SMALL_RUN, "XENSIM_SECONDS": "120"})], secure_server, tmp_path)
    with launch.started(argv, env=guest_env()) as replica:
        deadline = time.monotonic() + 60
        while len(vcpus := children(replica.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(vcpus) == 2
        replica.process.send_signal(signal.SIGTERM)
        replica.finish(30)
    err = replica.log()
    assert replica.process.returncode == 143 and "Traceback" not in err, err
    assert not [pid for pid in vcpus if alive(pid)]
