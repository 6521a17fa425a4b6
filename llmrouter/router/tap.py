"""``twistd llmrouter``: command line, and the service tree of a running router.

Settings come from defaults < ``--env-file`` < environment < command line (see
:mod:`llmrouter.router.settings`); ``twistd -n llmrouter --help`` lists every option and variable.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource

from llmrouter import secmem
from llmrouter.daykey import DayKey, shared_day_keys
from llmrouter.listen import ListenError, certificate_expiry, server_endpoint
from llmrouter.protocol import ProtocolError
from llmrouter.router import preflight
from llmrouter.router.addresses import LOCAL, TrustedProxies, bucket
from llmrouter.router.admission import Admission
from llmrouter.router.app import RouterApp, RouterSite
from llmrouter.router.connections import ConnectionGuard
from llmrouter.router.interfaces import IAdmissionStore
from llmrouter.router.keydoc import KeyDocumentV2Source, refuse_operator_key, router_cert_problem
from llmrouter.router.memory import MemoryStore
from llmrouter.router.metrics import MetricsResource, RouterMetrics
from llmrouter.router.nodes import NodePool
from llmrouter.router.relay import Relay
from llmrouter.router.seclog import SecurityLog
from llmrouter.router.settings import ENV_NAMES, Settings, SettingsError, endpoint_entries, load
from llmrouter.terminate.backends import BackendPool
from llmrouter.terminate.cachekey import CACHE_LABEL, CacheKeys

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
        "Encrypted (HPKE) chat router: admits protocol v1.1 requests, forwards them to OpenAI-style"
        " inference backends and streams the tokens back sealed as SSE. Every option falls back"
        " to the environment variable in brackets; --env-file loads KEY=VALUE lines first (the"
        " environment and the command line override it). SIGHUP re-reads the key directory and"
        " the client certificate for https:// backends;"
        " `llmrouter-keys --keys-dir DIR rotate|revoke KID` changes the keys of a running router"
        " within seconds. With ENVIRONMENT=production, settings that are unsafe in production"
        " stop the router, each named (--check runs only these checks). Reference:"
        " docs/router.md."
    )
    optFlags = [
        ["check", None, "Check the settings (and the production preflight), print, exit."],
    ]
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
            "default-model",
            None,
            None,
            "Model for requests that name none [DEFAULT_MODEL] (default: any backend).",
        ],
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

        overrides: dict[str, Any] = {
            "listen": self["listen"],
            "inference_endpoints": [e for value in self["inference"] for e in _entries(value)],
            "default_model": self["default-model"],
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
            preflight.check(self.settings)
        except SettingsError as e:
            if self["check"]:
                raise SystemExit(f"llmrouter: {e}") from None
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            _check_readable(self.settings)  # as this user: run it as the service's
            print(f"llmrouter: settings OK ({self.settings.environment})")
            for line in preflight.modes(self.settings, v2_problem(self.settings)):
                print(f"llmrouter: {line}")
            raise SystemExit(0)


Options.opt_listen.__doc__ = (
    "Public endpoint (repeatable): tcp:8080:interface=127.0.0.1, ssl:..., "
    "systemd:domain=INET:index=0, unix:/path [LISTEN] (default tcp:8080:interface=127.0.0.1)."
)
Options.opt_inference.__doc__ = (
    "Inference backend unix:/path.sock or https://host:port, optionally followed by model=NAME"
    " (repeatable) and kind=llmrouter|llama-server|vllm|ollama|openai (repeatable; replaces "
    "INFERENCE_ENDPOINTS) (default unix:/run/llmrouter/inference.sock)."
)


def _entries(value: str) -> tuple[str, ...]:
    try:
        return endpoint_entries(value)
    except ValueError:
        raise usage.UsageError("--inference: an option before any endpoint") from None


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
        self.keys = keys or open_keys(settings, clock)
        self.events = SecurityLog(emit=emit, clock=clock, counter=self.metrics.security_events)
        self.keys.events = self.events
        self.metrics.watch_keys(lambda: self.keys.rotations, self.keys.current_key_age)
        self.pool = BackendPool.from_settings(reactor, clock, settings, self.metrics)
        remote = any(url.startswith("https:") for url in settings.inference_endpoints)
        self._client_cert = settings.upstream_tls_cert if remote else None
        if self._client_cert is not None:
            self.metrics.client_certificate_expiry(certificate_expiry(self._client_cert))
        self.store = store_for(settings, reactor, clock, self.keys, self.metrics)
        self.admission = Admission(
            settings,
            clock,
            self.keys,
            self.store,
            self.pool,
            self.metrics,
            self.events if settings.security_log else None,
        )
        self.nodes = NodePool(
            clock,
            self.pool.backends,
            settings.health_interval_seconds,
            settings.connect_timeout_seconds,
        )
        document = KeyDocumentV2Source(
            self.keys, settings.keys_dir, self.nodes, clock, settings.default_model
        )
        self.relay = Relay(settings, clock, self.admission, self.nodes, document, self.metrics)
        self.app = RouterApp(
            settings,
            clock,
            self.keys,
            lambda: True,
            self.pool,
            self.admission,
            self.metrics,
            cache_keys(settings, clock, self.keys),
            self.relay,
        )
        self.site = site or RouterSite(Resource(), settings.max_body_bytes)
        self.site.resource = self.app.resource()
        self.site.on_too_large = self._too_large
        proxies = TrustedProxies.parse(settings.trusted_proxies)
        self.site.guard = ConnectionGuard(
            clock,
            self.metrics,
            settings.request_read_seconds,
            settings.max_connections,
            settings.max_connections_per_address,
            lambda peer: (
                None
                if proxies.trusts(peer) or peer == LOCAL
                else bucket(peer, settings.rate_limit_ipv6_prefix)
            ),
        )

    def _too_large(self, error: ProtocolError) -> None:
        self.admission.reject(error)
        self.metrics.http_responses.labels(str(error.status)).inc()

    def start(self) -> None:
        self.keys.start()
        self.store.start()
        self.pool.start()
        self.nodes.start()

    def stop(self) -> Deferred[object]:
        """End open streams (sealed error), stop timers, wipe keys; fires when connections close."""
        self.app.shutdown()
        for relayed in list(self.relay.streams):
            relayed.shutdown()
        self.nodes.stop()
        closed = self.pool.stop()
        self.keys.close()  # wipes the secret keys held in locked memory
        stopped = self.store.stop()
        if stopped is None:
            return closed
        both: list[Deferred[Any]] = [closed, stopped]
        return gatherResults(both, consumeErrors=True).addCallback(lambda _: None)

    def reload(self) -> None:
        """SIGHUP: the key directory, and the client certificate for https:// backends (the
        renewal reloads every router instead of restarting it; llmrouter-pki-renew.service)."""
        if self.keys.reload():
            log.info("key directory re-read")
        try:
            reloaded = self.pool.reload_tls()
        except Exception as e:  # a half-written or unreadable file: keep the loaded one
            log.error(
                "client certificate not reloaded ({error}); the one loaded before stays",
                error=type(e).__name__,
            )
            return
        if reloaded and self._client_cert is not None:
            self.metrics.client_certificate_expiry(certificate_expiry(self._client_cert))
            log.info("client certificate re-read")


def v2_problem(settings: Settings) -> str | None:
    """Why protocol v2 is off for these settings' key directory (None: it is on)."""
    refusal = refuse_operator_key(settings.keys_dir)
    if refusal is not None:
        return refusal
    return router_cert_problem(settings.keys_dir)


def open_keys(settings: Settings, clock: IReactorTime) -> Any:
    """The key store: the leader's (creates and rotates) or a follower's (only reads)."""
    from llmrouter.keystore import KeyStore  # imported late: keeps `twistd --help` light

    follower = settings.keys_role == "follower"
    return KeyStore.open(
        settings.keys_dir,
        clock,
        rotation_seconds=None if follower else settings.key_rotation_hours * 3600,
        overlap_seconds=None if follower else settings.key_overlap_seconds,
        follower=follower,
    )


def cache_keys(settings: Settings, clock: IReactorTime, keys: Any) -> CacheKeys:
    """The prompt-cache keys: this router's own random day key, or with several routers
    (``STATE_URL``) one derived from the shared ``state-hash.key``, so a device's next turn hits
    its cache whichever router the balancer picks."""
    if not settings.state_url:
        return CacheKeys(DayKey(clock))
    return CacheKeys(DayKey(clock, shared_day_keys(clock, lambda: keys.state_key, CACHE_LABEL)))


def store_for(
    settings: Settings, reactor: Any, clock: IReactorTime, keys: Any, metrics: RouterMetrics
) -> IAdmissionStore:
    """Admission's state: this process's memory, or Redis shared by several routers."""
    if not settings.state_url:
        return MemoryStore(settings, clock)
    from llmrouter.router.redisstore import RedisStore  # txredisapi only where it is used

    return RedisStore(settings, reactor, clock, lambda: keys.state_key, metrics)


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
        self.router.pool.first_round.addCallback(self._refuse_to_start)

    def _refuse_to_start(self, _: object) -> None:
        """Production does not start against a backend it refuses (a llama-server whose /slots
        answers): stop with a failure status and say which, rather than serve without it."""
        refused = sorted(self.router.pool.refused) if self.router is not None else []
        if not refused:
            return
        log.critical(
            "refusing to start: {names} expose prompts (llama-server GET /slots); restart"
            ' them with --no-slots (docs/inference.md, "Backends and privacy")',
            names=", ".join(refused),
        )
        self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self._reactor.stop()

    def _sighup(self, signum: int, frame: Any) -> None:
        if self.router is not None:
            self._reactor.callFromThread(self.router.reload)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        super().stopService()
        if self.router is None:
            return None
        return self.router.stop()


def _check_readable(settings: Settings) -> None:
    """Fail fast (before twistd forks) on TLS files this user cannot read, e.g. a client key a
    renewal left owned by root: the router would otherwise start without any https backend."""
    for env, path in (
        ("UPSTREAM_TLS_CA", settings.upstream_tls_ca),
        ("UPSTREAM_TLS_CERT", settings.upstream_tls_cert),
        ("UPSTREAM_TLS_KEY", settings.upstream_tls_key),
    ):
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            raise SystemExit(
                f"llmrouter: cannot read {env} {path}: {e.strerror}; the router's user needs "
                "read access (e.g. 0640 root:llmrouter for the key)"
            ) from None


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    settings = options.settings
    assert settings is not None
    secmem.harden_process()  # before any key material is read
    from llmrouter.keystore import KeyStoreError

    # Fail fast (before twistd forks) on an unusable key directory; a leader creates it on first
    # start, a follower refuses to start without it.
    refusal = refuse_operator_key(settings.keys_dir)
    if refusal is not None:
        raise SystemExit(f"llmrouter: {refusal}")
    try:
        open_keys(settings, reactor).close()
    except KeyStoreError as e:
        raise SystemExit(f"llmrouter: {e}") from None
    _check_readable(settings)
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
