"""Router settings: one frozen value built from defaults < env file < environment < command line.

Everything the router can be told lives in :class:`Settings`; the rest of the code receives that
value and never reads ``os.environ`` itself, so tests build settings explicitly. Validation happens
here, once, at startup, with messages that name the offending setting (never its value when the
value might be secret; none of these are).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrouter.chat import MODEL_NAME
from llmrouter.protocol import SKEW_SECONDS
from llmrouter.router.addresses import TrustedProxies
from llmrouter.terminate.config import Endpoint

__all__ = [
    "ENV_NAMES",
    "Endpoint",
    "Settings",
    "SettingsError",
    "endpoint_entries",
    "load",
    "read_env_file",
]


# redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... and unix:///PATH[?db=DB]
STATE_URL = re.compile(
    r"rediss?://(?:[^@/\s]*@)?(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?(?:/\d{1,2})?"
    r"|unix://(?:[^@/\s]*@)?/[^?\s]+(?:\?db=\d{1,2})?"
)


class SettingsError(ValueError):
    """A setting is missing, malformed or out of range; the message names it."""


def _split(value: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[,\s]+", value.strip()) if part)


_OPTION = re.compile(r"(model|kind)=")


def endpoint_entries(value: str) -> tuple[str, ...]:
    """Entries ``URL [model=NAME ...] [kind=KIND]``: an option belongs to the URL before it, so
    commas and whitespace still separate plain URLs as they always did."""
    entries: list[str] = []
    for token in _split(value):
        if _OPTION.match(token):
            if not entries:
                raise ValueError("an option before any endpoint")
            entries[-1] += " " + token
        else:
            entries.append(token)
    return tuple(entries)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected a boolean")


def _opt_path(value: str) -> Path | None:
    return Path(value) if value.strip() else None


@dataclass(frozen=True)
class Settings:
    """All router settings. Field docs double as ``docs/router.md``'s reference table."""

    environment: str = "development"
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    metrics_listen: str = "tcp:9100:interface=127.0.0.1"
    keys_dir: Path = Path("./dev-keys")
    inference_endpoints: tuple[str, ...] = ("unix:/run/llmrouter/inference.sock kind=llmrouter",)
    default_model: str | None = None
    device_auth: str = "optional"
    upstream_tls_cert: Path | None = None
    upstream_tls_key: Path | None = None
    upstream_tls_ca: Path | None = None
    upstream_tls_server_name: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    rate_limit_ipv6_prefix: int = 56  # a /48 holder gets 256 buckets, not 65,536 (issue 19)
    request_ttl_seconds: float = 300.0
    circuit_breaker_threshold: int = 5
    circuit_reset_seconds: float = 30.0
    rate_limit_per_minute: float = 60.0
    rate_limit_burst: int = 20
    device_rate_limit_per_minute: float = 30.0
    device_rate_limit_burst: int = 10
    new_device_pow_difficulty: int = 16
    new_devices_per_hour: float = 30.0
    new_device_burst: int = 10
    max_known_devices: int = 1_000_000
    key_rotation_hours: float = 24.0
    key_overlap_seconds: float = 3600.0
    replay_window_seconds: float = 150.0
    replay_max_entries: int = 1_000_000
    max_body_bytes: int = 262144
    pad_bytes: int = 64
    stream_cadence_ms: int = 0
    keepalive_seconds: float = 15.0
    write_stall_seconds: float = 30.0
    pow_threshold_streams: int = 0
    pow_threshold_rps: float = 0.0
    pow_difficulty: int = 18
    epsilon_total: float = 10.0
    epsilon_per_query: float = 0.1
    budget_period_seconds: float = 86400.0
    budget_max_devices: int = 1_000_000
    max_streams: int = 1024
    request_read_seconds: float = 15.0
    max_connections: int = 4096
    max_connections_per_address: int = 64
    max_streams_per_device: int = 4
    connect_timeout_seconds: float = 5.0
    first_token_timeout_seconds: float = 60.0
    idle_timeout_seconds: float = 30.0
    retry_max: int = 2
    retry_backoff_seconds: float = 0.1
    retry_backoff_max_seconds: float = 2.0
    health_interval_seconds: float = 5.0
    llama_server_cache_prompt: bool = False
    security_log: bool = True
    # Shared state (several routers): empty keeps the tables in memory. Not in repr: a URL may
    # carry the Redis password.
    state_url: str = field(default="", repr=False)
    state_tls_ca: Path | None = None
    state_lease_seconds: float = 30.0
    keys_role: str = "leader"
    # Protocol v1/v1.1 (the router opens requests): "" as configured (production refuses it
    # toward remote backends), "allow" also toward remote ones, "off": protocol v2 only.
    router_terminated: str = ""
    _sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    def source_of(self, name: str) -> str:
        """Where a setting came from: default, env file, environment or command line."""
        return self._sources.get(name, "default")

    @property
    def production(self) -> bool:
        return self.environment == "production"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def remote_endpoints(self) -> tuple[str, ...]:
        """Backends not on this host's UNIX sockets: a v1/v1.1 prompt to them leaves the host."""
        return tuple(e.url for e in self.endpoints() if not e.url.startswith("unix:"))

    def endpoints(self) -> tuple[Endpoint, ...]:
        try:
            return tuple(Endpoint.parse(entry) for entry in self.inference_endpoints)
        except ValueError as e:
            raise SettingsError(str(e)) from None


# Environment variable name -> (field, parser). Names are contracts (systemd units, docs).
_Parser = Callable[[str], Any]
ENV_NAMES: dict[str, tuple[str, _Parser]] = {
    "ENVIRONMENT": ("environment", str.strip),
    "LISTEN": ("listen", _split),
    "METRICS_LISTEN": ("metrics_listen", str.strip),
    "KEYS_DIR": ("keys_dir", Path),
    "INFERENCE_ENDPOINTS": ("inference_endpoints", endpoint_entries),
    "DEFAULT_MODEL": ("default_model", lambda v: v.strip() or None),
    "DEVICE_AUTH": ("device_auth", str.strip),
    "UPSTREAM_TLS_CERT": ("upstream_tls_cert", _opt_path),
    "UPSTREAM_TLS_KEY": ("upstream_tls_key", _opt_path),
    "UPSTREAM_TLS_CA": ("upstream_tls_ca", _opt_path),
    "UPSTREAM_TLS_SERVER_NAME": ("upstream_tls_server_name", lambda v: v.strip() or None),
    "TRUSTED_PROXIES": ("trusted_proxies", _split),
    "CORS_ORIGINS": ("cors_origins", _split),
    "RATE_LIMIT_IPV6_PREFIX": ("rate_limit_ipv6_prefix", int),
    "REQUEST_TTL_SECONDS": ("request_ttl_seconds", float),
    "CIRCUIT_BREAKER_THRESHOLD": ("circuit_breaker_threshold", int),
    "CIRCUIT_RESET_SECONDS": ("circuit_reset_seconds", float),
    "RATE_LIMIT_PER_MINUTE": ("rate_limit_per_minute", float),
    "RATE_LIMIT_BURST": ("rate_limit_burst", int),
    "DEVICE_RATE_LIMIT_PER_MINUTE": ("device_rate_limit_per_minute", float),
    "DEVICE_RATE_LIMIT_BURST": ("device_rate_limit_burst", int),
    "NEW_DEVICE_POW_DIFFICULTY": ("new_device_pow_difficulty", int),
    "NEW_DEVICES_PER_HOUR": ("new_devices_per_hour", float),
    "NEW_DEVICE_BURST": ("new_device_burst", int),
    "MAX_KNOWN_DEVICES": ("max_known_devices", int),
    "KEY_ROTATION_HOURS": ("key_rotation_hours", float),
    "KEY_OVERLAP_SECONDS": ("key_overlap_seconds", float),
    "REPLAY_WINDOW_SECONDS": ("replay_window_seconds", float),
    "REPLAY_MAX_ENTRIES": ("replay_max_entries", int),
    "MAX_BODY_BYTES": ("max_body_bytes", int),
    "PAD_BYTES": ("pad_bytes", int),
    "STREAM_CADENCE_MS": ("stream_cadence_ms", int),
    "KEEPALIVE_SECONDS": ("keepalive_seconds", float),
    "WRITE_STALL_SECONDS": ("write_stall_seconds", float),
    "POW_THRESHOLD_STREAMS": ("pow_threshold_streams", int),
    "POW_THRESHOLD_RPS": ("pow_threshold_rps", float),
    "POW_DIFFICULTY": ("pow_difficulty", int),
    "EPSILON_TOTAL": ("epsilon_total", float),
    "EPSILON_PER_QUERY": ("epsilon_per_query", float),
    "BUDGET_PERIOD_SECONDS": ("budget_period_seconds", float),
    "BUDGET_MAX_DEVICES": ("budget_max_devices", int),
    "MAX_STREAMS": ("max_streams", int),
    "REQUEST_READ_SECONDS": ("request_read_seconds", float),
    "MAX_CONNECTIONS": ("max_connections", int),
    "MAX_CONNECTIONS_PER_ADDRESS": ("max_connections_per_address", int),
    "MAX_STREAMS_PER_DEVICE": ("max_streams_per_device", int),
    "CONNECT_TIMEOUT_SECONDS": ("connect_timeout_seconds", float),
    "FIRST_TOKEN_TIMEOUT_SECONDS": ("first_token_timeout_seconds", float),
    "IDLE_TIMEOUT_SECONDS": ("idle_timeout_seconds", float),
    "RETRY_MAX": ("retry_max", int),
    "RETRY_BACKOFF_SECONDS": ("retry_backoff_seconds", float),
    "RETRY_BACKOFF_MAX_SECONDS": ("retry_backoff_max_seconds", float),
    "HEALTH_INTERVAL_SECONDS": ("health_interval_seconds", float),
    "LLAMA_SERVER_CACHE_PROMPT": ("llama_server_cache_prompt", _bool),
    "SECURITY_LOG": ("security_log", _bool),
    "STATE_URL": ("state_url", str.strip),
    "STATE_TLS_CA": ("state_tls_ca", _opt_path),
    "STATE_LEASE_SECONDS": ("state_lease_seconds", float),
    "KEYS_ROLE": ("keys_role", str.strip),
    "ROUTER_TERMINATED": ("router_terminated", lambda v: v.strip().lower()),
}
_FIELD_TO_ENV = {field_name: env for env, (field_name, _) in ENV_NAMES.items()}


def _positive(s: Settings, *names: str) -> None:
    for name in names:
        if not getattr(s, name) > 0:
            raise SettingsError(f"{_FIELD_TO_ENV.get(name, name)} must be greater than 0")


def _non_negative(s: Settings, *names: str) -> None:
    for name in names:
        if getattr(s, name) < 0:
            raise SettingsError(f"{_FIELD_TO_ENV.get(name, name)} must not be negative")


def _validate(s: Settings) -> None:
    if s.environment not in ("development", "production"):
        raise SettingsError("ENVIRONMENT must be development or production")
    if s.device_auth not in ("required", "optional"):
        raise SettingsError("DEVICE_AUTH (--device-auth) must be required or optional")
    if not s.listen:
        raise SettingsError("LISTEN (--listen) needs at least one endpoint")
    if not s.metrics_listen:
        raise SettingsError("METRICS_LISTEN (--metrics-listen) must not be empty")
    if not s.inference_endpoints:
        raise SettingsError("INFERENCE_ENDPOINTS (--inference) needs at least one backend")
    needs_tls = False
    endpoints = s.endpoints()
    for endpoint in (e.url for e in endpoints):
        if endpoint.startswith("unix:") and len(endpoint) > len("unix:"):
            continue
        if re.fullmatch(r"https://[^/\s:]+(:\d{1,5})?/?", endpoint):
            needs_tls = True
            continue
        if re.fullmatch(r"http://(127\.0\.0\.1|localhost|\[::1\])(:\d{1,5})?/?", endpoint):
            continue  # plain HTTP only on loopback (development, benchmarks)
        raise SettingsError(
            "INFERENCE_ENDPOINTS entries must be unix:/path.sock or https://host:port"
            " (plain http:// only on loopback)"
        )
    if needs_tls:
        missing = [
            env
            for env, value in (
                ("UPSTREAM_TLS_CERT", s.upstream_tls_cert),
                ("UPSTREAM_TLS_KEY", s.upstream_tls_key),
                ("UPSTREAM_TLS_CA", s.upstream_tls_ca),
            )
            if value is None
        ]
        if missing:
            raise SettingsError(
                "https:// inference endpoints use mutual TLS and need " + ", ".join(missing)
            )
    if s.default_model is not None:
        if not MODEL_NAME.fullmatch(s.default_model):
            raise SettingsError("DEFAULT_MODEL must be a model name (letters, digits, ._:/@+-)")
        if all(e.models for e in endpoints) and not any(
            s.default_model in e.models for e in endpoints
        ):
            raise SettingsError("DEFAULT_MODEL is not among the model= names of the endpoints")
    try:
        TrustedProxies.parse(s.trusted_proxies)
    except ValueError:
        raise SettingsError(
            "TRUSTED_PROXIES must be IP addresses, CIDR networks or the word unix"
        ) from None
    if not 8 <= s.rate_limit_ipv6_prefix <= 128:
        raise SettingsError("RATE_LIMIT_IPV6_PREFIX must be from 8 to 128 (prefix length)")
    for origin in s.cors_origins:
        if not re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?", origin):
            raise SettingsError("CORS_ORIGINS entries must be origins: http(s)://host[:port]")
    _positive(
        s,
        "request_ttl_seconds",
        "circuit_breaker_threshold",
        "circuit_reset_seconds",
        "rate_limit_per_minute",
        "rate_limit_burst",
        "device_rate_limit_per_minute",
        "device_rate_limit_burst",
        "new_devices_per_hour",
        "new_device_burst",
        "max_known_devices",
        "budget_max_devices",
        "write_stall_seconds",
        "key_rotation_hours",
        "replay_window_seconds",
        "replay_max_entries",
        "max_body_bytes",
        "pad_bytes",
        "keepalive_seconds",
        "epsilon_total",
        "epsilon_per_query",
        "budget_period_seconds",
        "max_streams",
        "request_read_seconds",
        "max_connections",
        "max_connections_per_address",
        "max_streams_per_device",
        "connect_timeout_seconds",
        "first_token_timeout_seconds",
        "idle_timeout_seconds",
        "health_interval_seconds",
        "retry_backoff_seconds",
        "retry_backoff_max_seconds",
    )
    _non_negative(
        s,
        "key_overlap_seconds",
        "stream_cadence_ms",
        "pow_threshold_streams",
        "pow_threshold_rps",
        "retry_max",
    )
    if not 1 <= s.pow_difficulty <= 32:
        raise SettingsError("POW_DIFFICULTY must be from 1 to 32 (leading zero bits)")
    if not 0 <= s.new_device_pow_difficulty <= 32:
        raise SettingsError(
            "NEW_DEVICE_POW_DIFFICULTY must be from 0 (off) to 32 (leading zero bits)"
        )
    if s.replay_window_seconds < 2 * SKEW_SECONDS:
        raise SettingsError(
            f"REPLAY_WINDOW_SECONDS must be at least {2 * SKEW_SECONDS} (twice the"
            f" {SKEW_SECONDS} s timestamp skew), or a replay outlives its cache entry"
        )
    if s.epsilon_per_query > s.epsilon_total:
        raise SettingsError("EPSILON_PER_QUERY must not exceed EPSILON_TOTAL")
    if s.max_body_bytes > 16 * 1024 * 1024:
        raise SettingsError("MAX_BODY_BYTES must be at most 16 MiB")
    if s.pad_bytes > 4096:
        raise SettingsError("PAD_BYTES must be at most 4096")
    if s.key_overlap_seconds > s.key_rotation_hours * 3600:
        raise SettingsError("KEY_OVERLAP_SECONDS must not exceed the rotation period")
    if s.keys_role not in ("leader", "follower"):
        raise SettingsError("KEYS_ROLE must be leader or follower")
    if s.router_terminated not in ("", "allow", "off"):
        raise SettingsError("ROUTER_TERMINATED must be allow or off (or unset)")
    if s.state_url and STATE_URL.fullmatch(s.state_url) is None:
        # never the value: it may carry a password
        raise SettingsError(
            "STATE_URL must be redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS) or"
            " unix:///PATH[?db=DB] (empty: state in memory)"
        )
    if s.state_tls_ca is not None and not s.state_url.startswith("rediss://"):
        raise SettingsError("STATE_TLS_CA is for a rediss:// STATE_URL")
    if not 3 <= s.state_lease_seconds <= 3600:
        raise SettingsError("STATE_LEASE_SECONDS must be from 3 to 3600")


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; ``#`` comments, blank lines, optional ``export`` and quotes allowed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SettingsError(f"cannot read env file {path}: {e.strerror}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def load(
    environ: Mapping[str, str],
    env_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Settings | None = None,
) -> Settings:
    """Layer the sources: ``base`` (defaults) < env file < ``environ`` < ``overrides`` (CLI).

    ``overrides`` maps field names to already-typed values; ``None`` values are ignored.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers: list[tuple[str, Mapping[str, str]]] = []
    if env_file is not None:
        layers.append((f"env file {env_file}", read_env_file(env_file)))
    layers.append(("environment", environ))
    for origin, layer in layers:
        for env, (name, parse) in ENV_NAMES.items():
            if env not in layer:
                continue
            try:
                values[name] = parse(layer[env])
            except ValueError:
                raise SettingsError(f"{env} ({origin}) is not a valid value") from None
            sources[name] = origin
    for name, value in (overrides or {}).items():
        if value is None or (isinstance(value, tuple | list) and not value):
            continue
        values[name] = tuple(value) if isinstance(value, list) else value
        sources[name] = "command line"
    start = base or Settings()
    return dataclasses.replace(start, **values, _sources=sources)


def names() -> Iterable[str]:
    return ENV_NAMES.keys()
