"""Production preflight: settings that are valid, but unsafe in production, stop the router.

``ENVIRONMENT=production`` turns this on; development stays permissive. Every check names the
setting, where it came from and what to set instead, and all problems are reported at once, so
an operator fixes a settings file in one pass. The checks read :class:`Settings` only (no files,
no network; the one host check is whether swap is on, from ``/proc/swaps``), so ``twistd
llmrouter --check`` can run them against a new release's settings before it is switched on
(docs/deployment.md, "Upgrade and rollback").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from llmrouter.listen import split_description
from llmrouter.router.addresses import TrustedProxies
from llmrouter.router.settings import Settings, SettingsError
from llmrouter.swap import SWAP_HINT, swap_devices

__all__ = ["check", "modes", "problems"]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Where a plain-HTTP metrics listener may be: networks that are never routed on the internet,
# like the WireGuard network (10.8.0.0/24). (ipaddress's is_private also counts documentation
# ranges, which are public addresses in every test that uses them.)
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


def _endpoint(description: str) -> tuple[str, dict[str, str]]:
    """(kind, options) of a server endpoint string."""
    args, kwargs = split_description(description.strip())
    return args[0].lower(), kwargs


def _address(interface: str | None, kind: str) -> _Address:
    """The address a ``tcp:``/``tcp6:`` endpoint binds (no interface: the wildcard)."""
    if interface is None:
        return ipaddress.ip_address("::" if kind == "tcp6" else "0.0.0.0")  # noqa: S104
    try:
        return ipaddress.ip_address(interface.strip("[]"))
    except ValueError:
        return ipaddress.ip_address("0.0.0.0")  # a host name: treat it as public  # noqa: S104


def _within(
    address: _Address, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def _origin(settings: Settings, name: str, env: str) -> str:
    return f"{env} ({settings.source_of(name)})"


def _device_auth(s: Settings) -> Iterator[str]:
    if s.device_auth != "required":
        yield (
            f"{_origin(s, 'device_auth', 'DEVICE_AUTH')} is {s.device_auth}: without device keys "
            "there are no per-device limits or budgets; set DEVICE_AUTH=required"
        )


def _keys_dir(s: Settings) -> Iterator[str]:
    if not s.keys_dir.is_absolute():
        yield (
            f"{_origin(s, 'keys_dir', 'KEYS_DIR')} is the relative path {s.keys_dir}: the keys "
            "(and the signing key apps pin) would depend on the working directory; set "
            "KEYS_DIR=/var/lib/llmrouter/keys"
        )


def _cadence(s: Settings) -> Iterator[str]:
    if s.stream_cadence_ms <= 0:
        yield (
            f"{_origin(s, 'stream_cadence_ms', 'STREAM_CADENCE_MS')} is 0 (off): chunk timing "
            "would reveal token boundaries; set STREAM_CADENCE_MS=50"
        )


def _listeners(s: Settings) -> Iterator[str]:
    where = _origin(s, "listen", "LISTEN")
    proxies_origin = _origin(s, "trusted_proxies", "TRUSTED_PROXIES")
    proxies = TrustedProxies.parse(s.trusted_proxies)  # valid: load() checked it
    for description in s.listen:
        kind, options = _endpoint(description)
        if kind == "unix" or (kind == "systemd" and options.get("domain", "").upper() == "UNIX"):
            if not proxies.unix:
                # Peers of a UNIX socket have no address: the proxy in front must be trusted
                # to name the client (X-Forwarded-For), or all clients share one bucket.
                yield (
                    f"{where} entry {description} is behind a proxy on a UNIX socket, but "
                    f"{proxies_origin} does not include unix: every client would share one "
                    "rate-limit bucket; set TRUSTED_PROXIES=unix"
                )
            continue
        if kind in ("ssl", "systemd"):
            continue  # TLS served here; systemd INET sockets: their address is systemd's
        if kind not in ("tcp", "tcp6"):
            yield f"{where} entry {description}: production accepts ssl:, unix:, systemd: or tcp:"
            continue
        address = _address(options.get("interface"), kind)
        if not address.is_loopback:
            yield (
                f"{where} entry {description} serves plain HTTP on {address}: use ssl: there, "
                "or keep tcp: on 127.0.0.1 behind the TLS proxy (Caddy)"
            )
        elif not proxies.trusts(str(address)):
            # A loopback listener is reached through the local TLS proxy: without it in
            # TRUSTED_PROXIES every client shares the proxy's per-IP rate-limit bucket.
            yield (
                f"{where} entry {description} is behind a local proxy, but {proxies_origin} "
                f"does not include {address}: every client would share one rate-limit bucket; "
                f"set TRUSTED_PROXIES={address}"
            )
    metrics_kind, options = _endpoint(s.metrics_listen)
    if metrics_kind in ("tcp", "tcp6"):
        address = _address(options.get("interface"), metrics_kind)
        if not (address.is_loopback or _within(address, _PRIVATE)):
            yield (
                f"{_origin(s, 'metrics_listen', 'METRICS_LISTEN')} {s.metrics_listen} serves "
                f"plain HTTP on {address}: use loopback or the WireGuard address "
                "(tcp:9100:interface=10.8.0.1)"
            )


def _upstreams(s: Settings) -> Iterator[str]:
    for endpoint in s.inference_endpoints:
        if endpoint.startswith("http://"):
            yield (
                f"{_origin(s, 'inference_endpoints', 'INFERENCE_ENDPOINTS')} entry {endpoint} "
                "is plain HTTP (development and benchmarks only): use unix:/path.sock on this "
                "host or https:// with mutual TLS (UPSTREAM_TLS_CERT, UPSTREAM_TLS_KEY, "
                "UPSTREAM_TLS_CA)"
            )


def _state(s: Settings) -> Iterator[str]:
    url = urlsplit(s.state_url)
    if url.scheme != "redis":
        return  # none, a UNIX socket, or TLS
    try:
        address = ipaddress.ip_address(url.hostname or "")
    except ValueError:
        address = None  # a host name: its address is not known here
    if address is None or not (address.is_loopback or _within(address, _PRIVATE)):
        yield (
            f"{_origin(s, 'state_url', 'STATE_URL')} is plain-text redis:// to "
            f"{url.hostname}: Redis would see its password and the routers' state in the clear;"
            " use unix:///run/redis/redis-server.sock on this host, rediss:// (TLS), or the"
            " WireGuard address (redis://:PASSWORD@10.8.0.1:6379/0)"
        )


def _router_terminated(s: Settings) -> Iterator[str]:
    remote = s.remote_endpoints
    if remote and s.router_terminated == "":
        yield (
            f"INFERENCE_ENDPOINTS has remote backends ({', '.join(remote)}) and protocol v1/v1.1"
            " is on: this router would open prompts and send them on to another host; set"
            " ROUTER_TERMINATED=off (protocol v2 only: the nodes open them) or, knowingly,"
            " ROUTER_TERMINATED=allow"
        )


def modes(settings: Settings, v2: str | None) -> list[str]:
    """The protocol modes in force, one line each, for ``--check`` and the start-up log.
    ``v2`` is None when protocol v2 is on, else why it is off."""
    s = settings
    lines = [
        "protocol v2 (the nodes open requests; the router relays ciphertext): "
        + ("on" if v2 is None else f"off ({v2})")
    ]
    if s.router_terminated == "off":
        lines.append("protocol v1/v1.1 (the router opens requests): off (ROUTER_TERMINATED=off)")
    else:
        remote = len(s.remote_endpoints)
        local = len(s.inference_endpoints) - remote
        lines.append(
            f"protocol v1/v1.1 (the router opens requests): on, toward {local} local and"
            f" {remote} remote backend(s)"
            + (" (ROUTER_TERMINATED=allow)" if s.router_terminated == "allow" else "")
        )
    return lines


_CHECKS: tuple[Callable[[Settings], Iterator[str]], ...] = (
    _device_auth,
    _keys_dir,
    _cadence,
    _listeners,
    _upstreams,
    _state,
    _router_terminated,
)


def problems(settings: Settings) -> list[str]:
    """What production mode refuses in ``settings`` (whatever ENVIRONMENT says), one line each."""
    return [problem for check in _CHECKS for problem in check(settings)]


def host_problems(swaps: Path = Path("/proc/swaps")) -> list[str]:
    """What production mode refuses on this host: swap in use (the router holds plaintext)."""
    devices = swap_devices(swaps)
    if not devices:
        return []
    return [
        f"swap is on ({', '.join(devices)}): decrypted prompts in memory may be written to disk;"
        f" {SWAP_HINT}"
    ]


def check(settings: Settings, swaps: Path = Path("/proc/swaps")) -> None:
    """Raise :class:`SettingsError` naming every problem, if ``settings`` are production's
    (and, then, if this host has swap on)."""
    if not settings.production:
        return
    found = problems(settings) + host_problems(swaps)
    if found:
        raise SettingsError(
            "ENVIRONMENT=production refuses to start with these settings:\n"
            + "\n".join(f"  - {line}" for line in found)
        )
