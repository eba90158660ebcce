"""docker-compose.yml as the tests read it: its services, and each command with compose's
`${VAR:-default}` interpolation done (Docker itself is not on the development machines)."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
_VARIABLE = re.compile(r"\$\{(\w+):-([^}]*)\}")


def document() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict:
    return document()["services"]


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """What compose substitutes: $VAR from `env`, else the default given in the file."""
    value = _VARIABLE.sub(lambda m: (env or {}).get(m.group(1), m.group(2)), value)
    assert "$" not in value, f"an interpolation this test does not understand: {value}"
    return value


def command(service: str, env: dict[str, str] | None = None) -> list[str]:
    """The service's command: the arguments of the image's entrypoint, `xensim`."""
    return [interpolate(arg, env) for arg in services()[service]["command"]]


def healthcheck(service: str) -> list[str]:
    """The health check's arguments to `xensim` (a health check bypasses the entrypoint)."""
    kind, program, *args = services()[service]["healthcheck"]["test"]
    assert (kind, program) == ("CMD", "xensim"), "an exec-form check of the installed command"
    return args
