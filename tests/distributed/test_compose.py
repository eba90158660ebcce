"""docker-compose.yml and the Dockerfile, checked without Docker: the services, how they
depend on each other, and that every command they run is a command of the installed `xensim`."""

import tomllib

import pytest

from hypervisor.server.config import config_from
from xensim.cli import build_parser

from .compose import DOCKERFILE, ROOT, command, document, healthcheck, interpolate, services

PORT = "50051"


def parse(argv: list[str]):
    """`xensim argv` as the image's entrypoint would parse it (argparse exits on an error)."""
    return build_parser().parse_args(argv)


def test_three_services_built_from_the_one_image():
    found = services()
    assert set(found) == {"hypervisor", "toolstack", "guest"}
    assert {(s["build"], s["image"]) for s in found.values()} == {(".", "xensim:local")}


def test_the_file_is_one_docker_compose_1_29_accepts_and_every_program_has_an_init():
    """Debian 12's docker-compose (1.29) refuses a top-level `name:`; a program run as PID 1
    has no default signal handling, so `init: true` puts tini in front of each."""
    assert {key for key in document() if not key.startswith("x-")} == {"services", "volumes"}
    assert all(service.get("init") is True for service in services().values())


def test_each_guest_replica_draws_its_own_seed():
    assert parse(command("guest")).seed is None  # xensim guest: one from the host name and pid


def test_dockerfile_installs_the_project_with_xensim_as_entrypoint():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {part.rstrip("/").removeprefix("./") for line in lines if line.startswith("COPY ") for part in line.split()[1:]}
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "README.md"} <= copied  # everything `pip install .` reads
    assert any(line.startswith("RUN pip install") and " . " in f"{line} " for line in lines)
    assert 'ENTRYPOINT ["xensim"]' in lines
    assert project["project"]["scripts"]["xensim"] == "xensim.cli:main"


def test_hypervisor_listens_on_every_interface_with_an_admin_token_and_checks_health_over_grpc(monkeypatch):
    hypervisor = services()["hypervisor"]
    args = parse(command("hypervisor"))
    assert args.command == "serve" and args.listen == f"0.0.0.0:{PORT}" and not args.insecure_no_admin_token
    token = interpolate(hypervisor["environment"]["XENSIM_ADMIN_TOKEN"])
    monkeypatch.setenv("XENSIM_ADMIN_TOKEN", token)
    assert config_from(args, build_parser()).admin_token == token  # serve accepts 0.0.0.0 only with a token
    health = parse(healthcheck("hypervisor"))
    assert health.command == "health" and health.server == f"127.0.0.1:{PORT}"
    assert hypervisor["ports"] == [f"${{XENSIM_PUBLISH:-127.0.0.1}}:{PORT}:{PORT}"]  # loopback unless asked


def test_toolstack_runs_once_the_hypervisor_is_healthy_and_writes_tokens_to_the_volume():
    toolstack = services()["toolstack"]
    args = parse(command("toolstack"))
    assert (args.command, args.action, args.server) == ("toolstack", "create", f"hypervisor:{PORT}")
    assert args.domains * args.vcpus == services()["guest"]["deploy"]["replicas"] * parse(command("guest")).vcpus_per_replica
    assert toolstack["depends_on"] == {"hypervisor": {"condition": "service_healthy"}}
    assert toolstack["environment"] == services()["hypervisor"]["environment"]
    assert toolstack["volumes"] == [f"tokens:{args.out}"]
    assert toolstack["restart"] == "no"


def test_guests_start_after_the_toolstack_succeeded_and_read_the_tokens_read_only():
    guest = services()["guest"]
    args = parse(command("guest"))
    assert args.command == "guest" and args.server is None  # the address comes with the token files
    assert guest["depends_on"] == {"toolstack": {"condition": "service_completed_successfully"}}
    assert guest["volumes"] == [f"tokens:{args.tokens}:ro"]
    assert "environment" not in guest  # no admin token: a guest needs only the endpoint and a domain token
    assert "tokens" in document()["volumes"]  # a named volume, shared with the toolstack


@pytest.mark.parametrize("service", ["hypervisor", "toolstack", "guest"])
def test_each_command_takes_its_settings_from_the_environment(service):
    """XENSIM_* variables reach the command (as `docker compose` substitutes them)."""
    defaults = command(service)
    variables = {name: "7" for name in ("XENSIM_FRAMES", "XENSIM_DOMAINS", "XENSIM_VCPUS", "XENSIM_PAGES", "XENSIM_VCPUS_PER_REPLICA", "XENSIM_SECONDS", "XENSIM_SEED")}
    changed = command(service, variables)
    assert changed != defaults and "7" in changed
    parse(changed)
