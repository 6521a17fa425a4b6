"""systemd unit files read as systemd reads them, for the operator tools that must see a
service as systemd starts it (``llmrouter-release check-settings``) and for the tests that
reproduce a unit's sandbox.

Only what those need: assignments per section with drop-ins applied in order (an empty
assignment clears a list), ``%i``, and the service's environment with systemd's precedence.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["UNIT_DIRS", "find_unit", "read_unit", "service_setting", "unit_environment"]

UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system")

Unit = dict[str, list[str]]


def read_unit(path: Path, dropins: Iterable[Path] = ()) -> Unit:
    """``[Service]`` (and other sections') assignments as ``{"Section.Key": [values...]}``, the
    unit file then its drop-ins in order. As in systemd, an empty assignment (``Key=``) clears
    what came before (and is kept as ``""``, so that ``CapabilityBoundingSet=`` means empty)."""
    result: Unit = {}
    for source in (path, *dropins):
        section = ""
        for raw in source.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, _, value = line.partition("=")
            name, value = f"{section}.{key.strip()}", value.strip()
            if value:
                result.setdefault(name, []).append(value)
            else:
                result[name] = [""]
    return result


def find_unit(name: str, root: Path = Path("/")) -> Unit:
    """The installed unit ``name`` (``llmrouter@2.service``: the template with ``%i`` = 2) and
    its drop-ins, found where systemd looks; FileNotFoundError when it is not installed."""
    template, instance = name, ""
    match = re.fullmatch(r"(.+@)(.+)(\.\w+)", name)
    if match is not None:
        template, instance = match.group(1) + match.group(3), match.group(2)
    for directory in UNIT_DIRS:
        path = root / directory.lstrip("/") / template
        if path.exists():
            break
    else:
        raise FileNotFoundError(f"no unit {name} installed")
    dropins: list[Path] = []
    for directory in UNIT_DIRS:
        for stem in sorted({name, template}):
            folder = root / directory.lstrip("/") / f"{stem}.d"
            if folder.is_dir():
                dropins += sorted(folder.glob("*.conf"))
    unit = read_unit(path, dropins)
    return {k: [v.replace("%i", instance) for v in vs] for k, vs in unit.items()}


def service_setting(unit: Unit, key: str, default: str = "") -> str:
    values = unit.get(f"Service.{key}")
    return values[-1] if values else default


def unit_environment(unit: Unit, resolve: Callable[[str], Path] = Path) -> dict[str, str]:
    """The environment systemd gives the service: ``Environment=`` assignments, then each
    ``EnvironmentFile=`` in order, whose lines override them (systemd's precedence).
    ``resolve`` maps a path the unit names to the file to read (tests read repository files)."""
    env: dict[str, str] = {}
    for line in unit.get("Service.Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    for name in unit.get("Service.EnvironmentFile", []):
        if not name:
            continue
        optional = name.startswith("-")
        path = resolve(name.lstrip("-"))
        if optional and not path.exists():
            continue
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            key, _, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            env[key.strip()] = value
    return env
