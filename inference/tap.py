"""``twistd inference``: command line, environment fallbacks and the service tree.

Every option falls back to an ``INFERENCE_*`` environment variable (names are a contract with the
systemd units). Listen strings are checked while parsing options, so a refused endpoint (plain TCP
off loopback, ``ssl:`` without TLS files) stops start-up with a one-line error, not a traceback.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from inference import embedded
from inference.config import DEFAULT_LISTEN, FLASH_ATTN, Settings
from inference.gate.config import FRONT_DIALECTS
from inference.gpu import offload_refusal, offloaded_layers, requested_layers
from inference.interfaces import IScheduler
from inference.listen import ListenError, ReloadableServerTLS, server_endpoint
from inference.metrics import Metrics
from llmrouter import sdnotify
from llmrouter.chat import MODEL_NAME
from llmrouter.listen import certificate_expiry
from llmrouter.ops import llamabuild
from llmrouter.swap import SWAP_HINT, swap_devices

__all__ = ["EngineService", "Options", "ReloadService", "makeService", "settings_from"]

log = Logger()

_FRONT = re.compile(r"unix:/\S+|http://(127\.0\.0\.1|localhost|\[::1\])(:\d{1,5})?/?")

LOAD_DELAY_ENV = "INFERENCE_TEST_LOAD_DELAY"
MISSING_EXTRA = (
    "twistd inference: llama-cpp-python is not installed;"
    " install the inference extra: pip install 'llmrouter[inference]'"
)

_D = Settings()

# option name -> (environment variable, converter, help)
_PARAMETERS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "model": (
        "INFERENCE_MODEL",
        str,
        "GGUF model file, or the name of an embedded model: "
        + ", ".join(embedded.MODELS)
        + f" (default: {embedded.DEFAULT}).",
    ),
    "model-name": (
        "INFERENCE_MODEL_NAME",
        str,
        "Model id in /v1/models (default: file stem); with --front, the one name the node serves"
        " the fronted server's model as (sent to it as the model; default: the names it lists).",
    ),
    "threads": ("INFERENCE_THREADS", int, "CPU threads for llama.cpp (default: all cores)."),
    "ctx": ("INFERENCE_CTX", int, f"Context size per sequence, in tokens (default {_D.ctx})."),
    "parallel": (
        "INFERENCE_PARALLEL",
        int,
        f"Sequences decoded together (continuous batching) (default {_D.parallel}).",
    ),
    "max-tokens": (
        "INFERENCE_MAX_TOKENS",
        int,
        f"Largest max_tokens a request may ask for (default {_D.max_tokens}).",
    ),
    "queue": (
        "INFERENCE_QUEUE",
        int,
        f"Requests that may wait for a slot; beyond, 503 + Retry-After (default {_D.queue}).",
    ),
    "time-budget": (
        "INFERENCE_TIME_BUDGET",
        float,
        f"Seconds a generation may take before it is stopped (default {_D.time_budget:g}).",
    ),
    "cache-ttl": (
        "INFERENCE_CACHE_TTL",
        float,
        "Seconds a finished conversation's KV cache stays reusable by the same cache key"
        f" (X-LLMRouter-Cache-Key); 0 turns the prompt cache off (default {_D.cache_ttl:g}).",
    ),
    "gpu-layers": (
        "INFERENCE_GPU_LAYERS",
        int,
        "Layers to offload to the GPU (llama.cpp n_gpu_layers; -1 = all; needs a"
        " llama-cpp-python built with CUDA, Vulkan or Metal) (default 0).",
    ),
    "flash-attn": (
        "INFERENCE_FLASH_ATTN",
        str,
        "Flash attention: on, off or auto (llama.cpp decides) (default auto).",
    ),
    "keys-dir": (
        "INFERENCE_KEYS_DIR",
        Path,
        "Protocol v2: the node's key directory (signing key, rotating HPKE keys, node.cert);"
        " serves GET /v2/keys and POST /v2/chat (default: none, v2 off).",
    ),
    "front": (
        "INFERENCE_FRONT",
        str,
        "Protocol v2 without a model: open requests for this model server (unix:/path.sock or"
        " http://127.0.0.1:PORT) and seal its stream; needs --keys-dir and --dialect.",
    ),
    "dialect": (
        "INFERENCE_DIALECT",
        str,
        "The fronted server's kind: " + "|".join(FRONT_DIALECTS) + ".",
    ),
    "stream-cadence-ms": (
        "INFERENCE_STREAM_CADENCE_MS",
        int,
        "Protocol v2: send one padded chunk every this many ms (hides token timing; 0: as"
        " tokens come) (default 0).",
    ),
    "pad-bytes": (
        "INFERENCE_PAD_BYTES",
        int,
        "Protocol v2: pad every sealed chunk to a multiple of this many bytes (default 64).",
    ),
    "max-streams": (
        "INFERENCE_MAX_STREAMS",
        int,
        "Protocol v2: sealed streams the gate holds at once; beyond, 503"
        f" (default {_D.max_streams}).",
    ),
    "tls-cert": ("INFERENCE_TLS_CERT", Path, "Server certificate (PEM, chain) for ssl: listeners."),
    "tls-key": ("INFERENCE_TLS_KEY", Path, "Server private key (PEM) for ssl: listeners."),
    "tls-ca": (
        "INFERENCE_TLS_CA",
        Path,
        "CA bundle client certificates must chain to (ssl: listeners).",
    ),
}
_FIELDS = {
    "model": "model",
    "model-name": "model_name",
    "threads": "threads",
    "ctx": "ctx",
    "parallel": "parallel",
    "max-tokens": "max_tokens",
    "queue": "queue",
    "time-budget": "time_budget",
    "cache-ttl": "cache_ttl",
    "gpu-layers": "gpu_layers",
    "flash-attn": "flash_attn",
    "keys-dir": "keys_dir",
    "front": "front",
    "dialect": "dialect",
    "stream-cadence-ms": "stream_cadence_ms",
    "pad-bytes": "pad_bytes",
    "max-streams": "max_streams",
    "tls-cert": "tls_cert",
    "tls-key": "tls_key",
    "tls-ca": "tls_ca",
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "llama.cpp inference daemon with an OpenAI-compatible streaming HTTP API:"
        " POST /v1/chat/completions, /v1/completions, /inference (always streamed);"
        " GET /health, /v1/models, /metrics.\n\n"
        "Each option falls back to the environment variable in brackets.\n"
        "Listen endpoints: unix:PATH[:mode=660] (default " + DEFAULT_LISTEN + "),"
        " ssl:PORT[:interface=ADDR] (mutual TLS 1.3 with --tls-cert/--tls-key/--tls-ca; clients"
        " without a certificate from that CA are refused in the handshake),"
        " systemd:domain=UNIX:index=N (socket activation), and tcp:PORT:interface=127.0.0.1"
        " (plain HTTP, loopback only)."
    )
    optParameters = [
        [name, None, None, f"{text} [{env}]"] for name, (env, _, text) in _PARAMETERS.items()
    ]
    optFlags = [
        [
            "allow-cpu-fallback",
            None,
            "Start even when --gpu-layers asks for a GPU this llama-cpp-python cannot use, running"
            " every layer on the CPU (without it the daemon refuses to start)"
            " [INFERENCE_ALLOW_CPU_FALLBACK=1].",
        ],
        [
            "kv-unified",
            None,
            "One KV cache buffer for all sequences instead of one per sequence: cheaper for many"
            " short unrelated requests, but every token then attends over all cached"
            " conversations [INFERENCE_KV_UNIFIED=1].",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint to serve on; repeatable [INFERENCE_LISTEN, comma- or space-separated]."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        front = self["front"] or os.environ.get("INFERENCE_FRONT")
        if not front:  # a fronting node loads no llama.cpp
            if importlib.util.find_spec("llama_cpp") is None:
                raise SystemExit(MISSING_EXTRA)
            check_build(os.environ)
        self.settings = settings_from(self, os.environ)
        refusal = _offload_refusal(self.settings)
        if refusal is not None:
            raise SystemExit(refusal)
        for description in self.settings.listen:
            try:
                server_endpoint(
                    _NoReactor(),
                    description,
                    tls_cert=self.settings.tls_cert,
                    tls_key=self.settings.tls_key,
                    tls_ca=self.settings.tls_ca,
                )
            except ListenError as e:
                raise usage.UsageError(str(e)) from None


def check_build(environ: Mapping[str, str]) -> None:
    """Refuse, in one line, a llama.cpp build that would crash here: ggml's AMX kernels without
    the operator's opt-in (``LLMROUTER_LLAMA_AMX=1``), or extensions this CPU lacks (a wheel
    built with ``-march=native`` on another machine, or taken from pip's cache)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    amx = environ.get(llamabuild.AMX_OPT_IN) == "1"
    problems = llamabuild.runtime_refusals(info, llamabuild.host_cpu_flags(), amx=amx)
    if problems:
        tool = Path(sys.executable).parent / llamabuild.PROG
        raise SystemExit(
            f"twistd inference: this llama-cpp-python must not run here: {'; '.join(problems)}."
            f" Rebuild it for this host with {llamabuild.PROG} ({tool})."
        )


class _NoReactor:
    """Stands in for the reactor while endpoints are only being validated."""


def settings_from(options: dict[str, Any], environ: dict[str, str] | Any) -> Settings:
    values: dict[str, Any] = {}
    for name, (env, convert, _) in _PARAMETERS.items():
        raw = options.get(name)
        if raw is None:
            raw = environ.get(env) or None
        if raw is None:
            continue
        try:
            value = convert(raw)
        except ValueError:
            raise usage.UsageError(f"--{name} [{env}]: invalid value") from None
        if name == "gpu-layers":
            if value < -1:
                raise usage.UsageError(f"--{name} [{env}]: -1 (all), 0 or more")
        elif name == "cache-ttl":
            if value < 0:
                raise usage.UsageError(f"--{name} [{env}]: must not be negative")
        elif name == "flash-attn":
            if value not in FLASH_ATTN:
                raise usage.UsageError(f"--{name} [{env}]: on, off or auto")
        elif name == "dialect":
            if value not in FRONT_DIALECTS:
                raise usage.UsageError(f"--{name} [{env}]: " + "|".join(FRONT_DIALECTS))
        elif name == "front":
            if not _FRONT.fullmatch(value):
                raise usage.UsageError(
                    f"--{name} [{env}]: unix:/path.sock or http://127.0.0.1:PORT (loopback)"
                )
        elif name == "stream-cadence-ms":
            if not 0 <= value <= 1000:
                raise usage.UsageError(f"--{name} [{env}]: 0 to 1000")
        elif isinstance(value, int | float) and value <= 0:
            raise usage.UsageError(f"--{name} [{env}]: must be positive")
        values[_FIELDS[name]] = value
    if "front" in values:
        if "keys_dir" not in values:
            raise usage.UsageError("--front needs --keys-dir (the node's key directory)")
        if "dialect" not in values:
            raise usage.UsageError("--front needs --dialect " + "|".join(FRONT_DIALECTS))
        if "model" in values:
            raise usage.UsageError("--front loads no model: leave --model out")
        if "model_name" in values and not MODEL_NAME.fullmatch(values["model_name"]):
            raise usage.UsageError("--model-name [INFERENCE_MODEL_NAME]: not a model name")
    elif "dialect" in values:
        raise usage.UsageError("--dialect is the kind of the --front server")
    model = values.pop("model", None)
    if model is None or model in embedded.MODELS:
        values["embedded"] = model or embedded.DEFAULT
    else:
        values["model"] = Path(model)
    for flag, field in (("kv-unified", "kv_unified"), ("allow-cpu-fallback", "allow_cpu_fallback")):
        env = "INFERENCE_" + field.upper()
        values[field] = bool(options.get(flag)) or environ.get(env, "").lower() in _TRUE
    listen = list(options.get("listen") or [])
    if not listen and environ.get("INFERENCE_LISTEN"):
        listen = [p for p in re.split(r"[,\s]+", environ["INFERENCE_LISTEN"]) if p]
    values["listen"] = tuple(listen) or (DEFAULT_LISTEN,)
    values.setdefault("threads", os.cpu_count() or 1)
    delay = environ.get(LOAD_DELAY_ENV)
    if delay:
        values["load_delay"] = float(delay)
    return Settings(**values)


_TRUE = ("1", "true", "yes", "on")


def _offload_refusal(settings: Settings) -> str | None:
    """Why GPU layers cannot be served here (inference.gpu), checked before anything loads."""
    if settings.gpu_layers == 0 or settings.front is not None:
        return None
    import llama_cpp

    return offload_refusal(
        settings.gpu_layers,
        bool(llama_cpp.llama_supports_gpu_offload()),
        settings.allow_cpu_fallback,
    )


def _model_path(settings: Settings) -> Callable[[], Path]:
    if settings.model is not None:
        model = settings.model
        return lambda: model
    return embedded.MODELS[settings.embedded]


class EngineService(service.Service):
    """Loads the model and runs its self-test when the service starts; only then is the daemon
    ready (``/health`` 200, and ``READY=1`` to systemd through ``notify``). Stopping the
    service stops the worker."""

    def __init__(
        self,
        scheduler: IScheduler,
        metrics: Metrics,
        reactor: Any,
        notify: Callable[[str], object] = sdnotify.notify,
        on_loaded: Callable[[], None] = lambda: None,
    ):
        self.scheduler = scheduler
        self.metrics = metrics
        self.reactor = reactor
        self.notify = notify
        self._on_loaded = on_loaded

    def startService(self) -> None:
        super().startService()
        self.notify("STATUS=loading the model and decoding its self-test")
        d: Any = self.scheduler.start()
        d.addCallbacks(self._loaded, self._failed)
        crashed: Any = self.scheduler.crashed
        crashed.addCallback(self._crashed)

    def _loaded(self, decoded: int) -> None:
        self._on_loaded()
        self.metrics.model_loaded.set(1)
        log.info("model loaded; its self-test decoded {tokens} tokens", tokens=decoded)
        self.notify("READY=1\nSTATUS=serving")

    def _failed(self, failure: Failure) -> None:
        log.critical("model failed to load: {error}", error=str(failure.value))
        self._exit(1)

    def _crashed(self, error: str) -> None:
        log.critical("generation worker died ({error}); exiting", error=error)
        self._exit(1)

    def _exit(self, code: int) -> None:
        """Stop with a failure status, so the service manager restarts us."""
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, code)
        self.reactor.stop()

    def stopService(self) -> Any:
        super().stopService()
        self.notify("STOPPING=1")
        self.metrics.model_loaded.set(0)
        return self.scheduler.stop()


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    # Where llama.cpp crashes the process (a fault in its kernels), the log then shows where:
    # file, line and function of each thread (never any data).
    if sys.__stderr__ is not None:
        faulthandler.enable(file=sys.__stderr__, all_threads=True)

    settings: Settings = getattr(options, "settings", None) or settings_from(options, os.environ)
    return build(settings, reactor)


def build(settings: Settings, reactor: Any) -> service.MultiService:
    if settings.front is not None:
        return build_front(settings, reactor)
    # llama.cpp only once the options are checked (postOptions names the missing extra)
    import llama_cpp

    from inference.api import InferenceAPI, QuietSite
    from inference.batched import BatchedScheduler

    # what was compiled in, for whoever reads the log after a crash (check_build vetted it)
    log.info("llama.cpp: {info}", info=llama_cpp.llama_print_system_info().decode().strip())

    refusal = _offload_refusal(settings)
    if refusal is not None:
        raise SystemExit(refusal)
    can_offload = bool(llama_cpp.llama_supports_gpu_offload())
    if settings.gpu_layers and not can_offload:
        log.warn(
            "--gpu-layers {layers}: this llama-cpp-python cannot offload to a GPU; every layer"
            " runs on the CPU (INFERENCE_ALLOW_CPU_FALLBACK)",
            layers=settings.gpu_layers,
        )
    _warn_swap()
    metrics = Metrics()
    scheduler = BatchedScheduler(
        reactor,
        _model_path(settings),
        parallel=settings.parallel,
        queue=settings.queue,
        ctx=settings.ctx,
        threads=settings.threads,
        batch=settings.batch,
        gpu_layers=settings.gpu_layers,
        flash_attn=FLASH_ATTN[settings.flash_attn],
        kv_unified=settings.kv_unified,
        cache_ttl=settings.cache_ttl,
        load_delay=settings.load_delay,
        on_token=metrics.tokens.inc,
        on_prompt=metrics.count_prompt,
    )
    metrics.watch(lambda: scheduler.active, lambda: scheduler.waiting, lambda: scheduler.cached)
    name = settings.model_name or (settings.model.stem if settings.model else settings.embedded)
    api = InferenceAPI(
        scheduler,
        metrics,
        reactor,
        model_name=name,
        ctx=settings.ctx,
        max_tokens=settings.max_tokens,
        time_budget=settings.time_budget,
        max_body=settings.max_body,
    )
    site = QuietSite(api, settings.max_body, metrics)

    def offload() -> None:
        assert scheduler.model is not None  # called once it is loaded
        n_layer = scheduler.model.n_layer
        metrics.gpu_layers_requested.set(requested_layers(settings.gpu_layers, n_layer))
        metrics.gpu_layers_offloaded.set(
            offloaded_layers(settings.gpu_layers, n_layer, can_offload)
        )

    top = service.MultiService()
    EngineService(scheduler, metrics, reactor, on_loaded=offload).setServiceParent(top)
    if settings.keys_dir is not None:
        site = _with_gate(settings, reactor, metrics, api, scheduler, top)
    _listen(settings, reactor, metrics, site, top)
    return top


def _with_gate(
    settings: Settings,
    reactor: Any,
    metrics: Metrics,
    api: Any,
    scheduler: IScheduler,
    top: service.MultiService,
) -> Any:
    """Protocol v2 in front of our engine: the gate feeds the engine in process (the API's own
    generation core), the public listeners serve ``/v2/*`` and the API."""
    from inference.api import QuietSite
    from inference.gate.resource import GateResource
    from inference.gate.service import build_gate

    limit = scheduler.parallel + settings.queue

    def busy() -> bool:
        return bool(scheduler.active + scheduler.waiting >= limit)

    gate, gate_service = build_gate(
        settings, reactor, reactor, metrics.registry, busy, engine=(api.generator, api.model_name)
    )
    gate_service.setServiceParent(top)
    return QuietSite(GateResource(gate, api), settings.max_body, metrics)


def build_front(settings: Settings, reactor: Any) -> service.MultiService:
    """``--front``: no model; the gate opens v2 requests for that model server."""
    from inference.api import QuietSite
    from inference.gate.resource import FrontAPI, GateResource
    from inference.gate.service import build_gate

    assert settings.front is not None
    _warn_swap()  # the gate holds prompts and answers in plaintext too
    metrics = Metrics()
    gate, gate_service = build_gate(settings, reactor, reactor, metrics.registry)
    top = service.MultiService()
    gate_service.setServiceParent(top)
    resource = GateResource(gate, FrontAPI(gate.ready, metrics.render))
    _listen(settings, reactor, metrics, QuietSite(resource, settings.max_body, metrics), top)
    FrontReadyService().setServiceParent(top)  # after the listeners: they listen by now
    return top


class FrontReadyService(service.Service):
    """A fronting node has no model to load: it is ready (``READY=1`` to systemd, whose units
    are ``Type=notify``) once its listeners are up; ``/health`` says when v2 can be served."""

    def __init__(self, notify: Callable[[str], object] = sdnotify.notify) -> None:
        self.notify = notify

    def startService(self) -> None:
        super().startService()
        self.notify("READY=1\nSTATUS=fronting a model server")

    def stopService(self) -> Any:
        self.notify("STOPPING=1")
        return super().stopService()


def _listen(
    settings: Settings, reactor: Any, metrics: Metrics, site: Any, top: service.MultiService
) -> None:
    """The public listeners; with mutual TLS, its files reloaded on SIGHUP (ReloadService)."""
    tls = None
    if any(d.split(":", 1)[0].lower() == "ssl" for d in settings.listen):
        assert settings.tls_cert and settings.tls_key and settings.tls_ca  # checked in options
        tls = ReloadableServerTLS(settings.tls_cert, settings.tls_key, settings.tls_ca)
        metrics.server_certificate_expiry(certificate_expiry(tls.cert))
        ReloadService(tls, metrics, reactor).setServiceParent(top)
    for description in settings.listen:
        endpoint = server_endpoint(
            reactor,
            description,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            tls_ca=settings.tls_ca,
            tls=tls,
        )
        listener = StreamServerEndpointService(endpoint, site)
        listener._raiseSynchronously = True
        listener.setServiceParent(top)


def _warn_swap() -> None:
    swap = swap_devices()
    if swap:  # this host holds prompts and their KV cache in plaintext
        log.error(
            "swap is on ({devices}): prompts and their KV cache may be written to disk; {hint}",
            devices=", ".join(swap),
            hint=SWAP_HINT,
        )


class ReloadService(service.Service):
    """SIGHUP reads the mutual-TLS certificate, key and CA again (after a renewal; the unit's
    ``ExecReload=``), without reloading the model or dropping connections."""

    def __init__(self, tls: ReloadableServerTLS, metrics: Metrics, reactor: Any) -> None:
        self._tls = tls
        self._metrics = metrics
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        try:
            self._tls.reload()
        except Exception as e:  # a half-copied file, a permission: keep what is loaded
            log.error(
                "TLS files not reloaded ({error}); the ones loaded before stay",
                error=type(e).__name__,
            )
            return
        self._metrics.server_certificate_expiry(certificate_expiry(self._tls.cert))
        log.info("TLS certificate re-read")

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()
