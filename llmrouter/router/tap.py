"""``twistd llmrouter``: command line, and the service tree of a running router.

Settings come from defaults < ``--env-file`` < environment < command line (see
:mod:`llmrouter.router.settings`); ``twistd -n llmrouter --help`` lists every option and variable.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource

from llmrouter.listen import ListenError, server_endpoint
from llmrouter.protocol import ProtocolError
from llmrouter.router import secmem
from llmrouter.router.admission import Admission, StreamSlots
from llmrouter.router.app import RouterApp, RouterSite
from llmrouter.router.budget import PrivacyBudget
from llmrouter.router.cachekey import CacheKeys
from llmrouter.router.metrics import MetricsResource, RouterMetrics
from llmrouter.router.ratelimit import RateLimiter
from llmrouter.router.replay import ReplayCache
from llmrouter.router.seclog import SecurityLog
from llmrouter.router.settings import ENV_NAMES, Settings, SettingsError, load
from llmrouter.router.upstream import BackendPool

__all__ = ["Options", "Router", "makeService"]

log = Logger()

_DEFAULTS = Settings()


def _env_help() -> str:
    lines = []
    for env, (name, _) in ENV_NAMES.items():
        default = getattr(_DEFAULTS, name)
        if isinstance(default, tuple):
            default = ",".join(default)
        lines.append(f"  {env:<30} (default: {default})")
    return "\n".join(lines)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Encrypted (HPKE) chat router: admits protocol v1 requests, forwards them to OpenAI-style"
        " inference backends and streams the tokens back sealed as SSE. Every option falls back"
        " to the environment variable in brackets; --env-file loads KEY=VALUE lines first (the"
        " environment and the command line override it). SIGHUP re-reads the key directory;"
        " `llmrouter-keys --keys-dir DIR rotate|revoke KID` changes the keys of a running router"
        " within seconds. Reference: docs/router.md."
    )
    optParameters = [
        ["env-file", None, None, "Load KEY=VALUE settings from this file first."],
        [
            "metrics-listen",
            None,
            None,
            "Endpoint for GET /metrics only [METRICS_LISTEN] (default "
            f"{_DEFAULTS.metrics_listen}).",
        ],
        ["keys-dir", None, None, f"Key directory [KEYS_DIR] (default {_DEFAULTS.keys_dir})."],
        [
            "device-auth",
            None,
            None,
            "required|optional: refuse mode base requests when required [DEVICE_AUTH]"
            " (default optional).",
        ],
        [
            "tls-client-cert",
            None,
            None,
            "Client certificate for https upstreams [UPSTREAM_TLS_CERT].",
        ],
        ["tls-client-key", None, None, "Client key for https upstreams [UPSTREAM_TLS_KEY]."],
        ["tls-ca", None, None, "Pinned CA of https upstreams [UPSTREAM_TLS_CA]."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["inference"] = []
        self.settings: Settings | None = None

    def opt_listen(self, endpoint: str) -> None:
        self["listen"].append(endpoint)

    def opt_inference(self, endpoint: str) -> None:
        self["inference"].append(endpoint)

    def getUsage(self, width: int | None = None) -> str:
        return (
            super().getUsage(width)
            + "\nAll settings (environment variables, env file KEY=VALUE lines):\n"
            + _env_help()
            + "\n"
        )

    def postOptions(self) -> None:
        import os

        overrides: dict[str, Any] = {
            "listen": self["listen"],
            "inference_endpoints": self["inference"],
            "metrics_listen": self["metrics-listen"],
            "keys_dir": Path(self["keys-dir"]) if self["keys-dir"] else None,
            "device_auth": self["device-auth"],
            "upstream_tls_cert": _path(self["tls-client-cert"]),
            "upstream_tls_key": _path(self["tls-client-key"]),
            "upstream_tls_ca": _path(self["tls-ca"]),
        }
        env_file = Path(self["env-file"]) if self["env-file"] else None
        try:
            self.settings = load(os.environ, env_file, overrides)
        except SettingsError as e:
            raise usage.UsageError(str(e)) from None


Options.opt_listen.__doc__ = (
    "Public endpoint (repeatable): tcp:8080:interface=127.0.0.1, ssl:..., "
    "systemd:domain=INET:index=0, unix:/path [LISTEN] (default tcp:8080:interface=127.0.0.1)."
)
Options.opt_inference.__doc__ = (
    "Inference backend unix:/path.sock or https://host:port (repeatable; replaces "
    "INFERENCE_ENDPOINTS) (default unix:/run/llmrouter/inference.sock)."
)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


class Router:
    """Every component of one router, wired together; ``reactor`` does I/O, ``clock`` time.

    Tests build one in-process with a :class:`~twisted.internet.task.Clock` as ``clock``.
    """

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        clock: IReactorTime | None = None,
        keys: Any = None,
        emit: Any = None,
        metrics: RouterMetrics | None = None,
        site: RouterSite | None = None,
    ) -> None:
        self.settings = settings
        clock = clock or reactor
        self.clock = clock
        self.metrics = metrics or RouterMetrics()
        from llmrouter.router.keys import KeyStore  # imported late: keeps `twistd --help` light

        self.keys = keys or KeyStore.open(
            settings.keys_dir,
            clock,
            rotation_seconds=settings.key_rotation_hours * 3600,
            overlap_seconds=settings.key_overlap_seconds,
        )
        self.events = SecurityLog(
            self.keys.log_hash_key, emit=emit, clock=clock, counter=self.metrics.security_events
        )
        self.keys.events = self.events
        self.metrics.watch_keys(lambda: self.keys.rotations, self.keys.current_key_age)
        self.pool = BackendPool.from_settings(reactor, clock, settings, self.metrics)
        self.admission = Admission(
            settings,
            clock,
            self.keys,
            RateLimiter(clock, settings.rate_limit_per_minute, settings.rate_limit_burst),
            RateLimiter(
                clock, settings.device_rate_limit_per_minute, settings.device_rate_limit_burst
            ),
            ReplayCache(clock, settings.replay_window_seconds, settings.replay_max_entries),
            PrivacyBudget(
                clock,
                settings.epsilon_total,
                settings.epsilon_per_query,
                settings.budget_period_seconds,
            ),
            StreamSlots(settings.max_streams, settings.max_streams_per_device),
            self.metrics,
            self.events if settings.security_log else None,
        )
        self.app = RouterApp(
            settings,
            clock,
            self.keys,
            lambda: True,
            self.pool,
            self.admission,
            self.metrics,
            CacheKeys(self.keys.log_hash_key),
        )
        self.site = site or RouterSite(Resource(), settings.max_body_bytes)
        self.site.resource = self.app.resource()
        self.site.on_too_large = self._too_large

    def _too_large(self, error: ProtocolError) -> None:
        self.admission.reject(error)
        self.metrics.http_responses.labels(str(error.status)).inc()

    def start(self) -> None:
        self.keys.start()
        self.pool.start()

    def stop(self) -> Deferred[object]:
        """End open streams (sealed error), stop timers, wipe keys; fires when connections close."""
        for stream in list(self.app.streams):
            stream.shutdown()
        closed = self.pool.stop()
        self.keys.close()  # wipes the secret keys held in locked memory
        return closed

    def reload_keys(self) -> None:
        if self.keys.reload():
            log.info("key directory re-read")


class RouterService(service.Service):
    """Builds the router when the service starts, i.e. after twistd has forked (memory locks
    are not inherited by a child), runs its timers, re-reads the key directory on SIGHUP."""

    def __init__(
        self, settings: Settings, reactor: Any, metrics: RouterMetrics, site: RouterSite
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._metrics = metrics
        self._site = site
        self.router: Router | None = None
        self._previous: Any = None

    def startService(self) -> None:
        secmem.harden_process()
        self.router = Router(self._settings, self._reactor, metrics=self._metrics, site=self._site)
        super().startService()
        self.router.start()
        self._previous = signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, signum: int, frame: Any) -> None:
        if self.router is not None:
            self._reactor.callFromThread(self.router.reload_keys)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        super().stopService()
        if self.router is None:
            return None
        return self.router.stop()


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    settings = options.settings
    assert settings is not None
    secmem.harden_process()  # before any key material is read
    from llmrouter.router.keys import KeyStore, KeyStoreError

    # Fail fast (before twistd forks) on an unusable key directory; creates it on first start.
    try:
        KeyStore.open(
            settings.keys_dir,
            reactor,
            rotation_seconds=settings.key_rotation_hours * 3600,
            overlap_seconds=settings.key_overlap_seconds,
        ).close()
    except KeyStoreError as e:
        raise SystemExit(f"llmrouter: {e}") from None
    metrics = RouterMetrics()
    # The public site gets its resource when the router is built (RouterService.startService);
    # the reactor does not run, so no request is served, before that.
    site = RouterSite(Resource(), settings.max_body_bytes)
    top = service.MultiService()
    RouterService(settings, reactor, metrics, site).setServiceParent(top)
    listeners = [(d, site) for d in settings.listen]
    listeners.append((settings.metrics_listen, RouterSite(MetricsResource(metrics), 4096)))
    for description, factory in listeners:
        try:
            endpoint = server_endpoint(reactor, description)
        except ListenError as e:
            raise SystemExit(f"llmrouter: {e}") from None
        listener = StreamServerEndpointService(endpoint, factory)
        listener._raiseSynchronously = True  # a port in use stops twistd with the error
        listener.setServiceParent(top)
    return top
