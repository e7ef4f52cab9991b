"""`digit-server`: serve an ONNX model over gRPC. Every flag is also a variable: DIGITS_ and the
flag's name (--grace-period: DIGITS_GRACE_PERIOD)."""

from __future__ import annotations

import difflib
import logging
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from digit_recognizer.server.config import CONTROL_MODES, LOG_FORMATS, LOG_LEVELS, ServerConfig
from digit_recognizer.server.cpus import available_cpus

# gRPC core writes its own unformatted lines (a failed TLS handshake at INFO, for one) to
# stderr, which breaks --log-format json; our logs say what matters. Set it to see them.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

_DEFAULTS = ServerConfig(model=Path("models/model.onnx"))
ENV_PREFIX = "DIGITS_"
_DEPRECATED_USED = "digits_deprecated_envvars"  # ctx.meta key: (old, new) names read


class _Option(click.Option):
    """An option read from DIGITS_<FLAG NAME>, and, with a warning, from the name click's
    auto_envvar_prefix gave it before: DIGITS_<PARAMETER NAME> (DIGITS_GRACE_S)."""

    def __init__(self, *args: Any, had_old_name: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = f"{ENV_PREFIX}{(self.name or '').upper()}"
        # Options added since the DIGITS_<FLAG NAME> names never had the old one.
        self.deprecated_envvar = old if had_old_name and old != self.envvar else None

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        value = super().resolve_envvar_value(ctx)
        if value is None and self.deprecated_envvar and os.environ.get(self.deprecated_envvar):
            ctx.meta.setdefault(_DEPRECATED_USED, []).append((self.deprecated_envvar, self.envvar))
            return os.environ[self.deprecated_envvar]
        return value


def option(*declarations: str, **settings: Any) -> Callable[[Any], Any]:
    """click.option with its variable named after the flag, shown in --help."""
    flag = next(d for d in declarations if d.startswith("--")).split("/")[0]
    envvar = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
    return click.option(*declarations, cls=_Option, envvar=envvar, show_envvar=True, **settings)


def _workers(_ctx: click.Context, _param: click.Parameter, value: str | int) -> int:
    if value == "auto":
        return available_cpus()
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"must be a whole number or auto, got {value!r}") from None


def _installed(*distributions: str) -> str:
    import importlib.metadata

    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def version_line() -> str:
    """What --version prints: this package, and the two libraries that do the serving."""
    return (
        f"digit-server {_installed('digit-recognizer')} "
        f"(onnxruntime {_installed('onnxruntime', 'onnxruntime-gpu')}, "
        f"grpcio {_installed('grpcio')}, Python {platform.python_version()})"
    )


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit(0)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@option(
    "--model",
    type=click.Path(path_type=Path),
    default=_DEFAULTS.model,
    help="The ONNX model written by digit-train: a repository of one model, named and "
    "versioned by its model card. Replace the file to serve a new version.",
)
@option(
    "--model-repository",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Serve every model of DIR/<name>/<version>/model.onnx (Triton's layout; versions "
    "are positive integers) instead of --model. Watched: versions come and go while serving.",
)
@option(
    "--version-policy",
    default=_DEFAULTS.version_policy,
    help="Which versions of each repository model are served: latest, all, or specific:1,3 "
    "(a model's config.pbtxt may say otherwise).",
)
@option(
    "--model-control-mode",
    type=click.Choice(CONTROL_MODES),
    default=_DEFAULTS.model_control_mode,
    help="Triton's model control. poll: the repository is watched (--reload-interval); none: "
    "what is there at start is served until a restart; explicit: the --load-model models, "
    "then what load and unload requests ask (RepositoryModelLoad/Unload), in one worker "
    "process.",
)
@option(
    "--load-model",
    multiple=True,
    help="With --model-control-mode explicit: a model of the repository to serve at start "
    "(repeat it for several; '*' alone = all).",
)
@option(
    "--default-model",
    default=_DEFAULTS.default_model,
    help="The model that calls naming none get. Default: the first name in the repository.",
)
@option(
    "--max-models",
    type=int,
    default=_DEFAULTS.max_models,
    help="Model versions served at once (each version of each model counts; each is a session "
    "in memory). What serves keeps its place; more are listed UNAVAILABLE with the reason.",
)
@option(
    "--max-model-bytes",
    type=int,
    default=_DEFAULTS.max_model_bytes,
    help="A bigger model.onnx is refused, by its size on disk, before it is read. Loading "
    "holds other calls ~1 ms per MB (onnxruntime keeps the GIL), so this also bounds that.",
)
@option(
    "--host",
    default=_DEFAULTS.host,
    help="Address to listen on ([::] = every interface, IPv4 and IPv6).",
)
@option(
    "--port",
    type=int,
    default=_DEFAULTS.port,
    help="gRPC port; 0 picks a free one (logged at start).",
)
@option(
    "--provider",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    help="onnxruntime execution provider. auto: CUDA when it really works, else CPU; "
    "cuda: refuse to start without it.",
)
@option(
    "--max-batch-size",
    type=int,
    default=_DEFAULTS.max_batch_size,
    help="Images per model run.",
)
@option(
    "--max-delay-us",
    type=int,
    default=_DEFAULTS.max_delay_us,
    help="Longest wait for a batch to fill, from the oldest queued image; "
    "0 = run at once when the model is free.",
)
@option(
    "--max-queue-size",
    type=int,
    default=_DEFAULTS.max_queue_size,
    help="Images queued before new requests get RESOURCE_EXHAUSTED.",
)
@option(
    "--inline-max-us",
    type=int,
    default=_DEFAULTS.inline_max_us,
    help="Model runs expected (from the last run) to take at most this many microseconds "
    "execute on the event loop thread, cheaper than a thread hand-off; longer ones on a "
    "worker thread. 0 = always the worker thread.",
)
@option(
    "--max-images-per-request",
    type=int,
    default=_DEFAULTS.max_images_per_request,
    help="Larger requests get INVALID_ARGUMENT.",
)
@option(
    "--intra-op-threads",
    type=int,
    default=_DEFAULTS.intra_op_threads,
    help="onnxruntime threads per model run; 0 = its default.",
)
@option(
    "--spin-wait/--no-spin-wait",
    default=_DEFAULTS.spin_wait,
    help="Let onnxruntime threads spin between runs: faster large batches, less CPU left for gRPC.",
)
@option(
    "--allow-tf32/--no-allow-tf32",
    default=_DEFAULTS.allow_tf32,
    help="CUDA: let matrix products run in TF32 (faster; probabilities then differ from the "
    "CPU's by ~5.6e-4 measured on an H100, beyond the 1e-5 the export is verified to). "
    "Off: full float32.",
)
@option(
    "--workers",
    default="auto",
    show_default=True,
    callback=_workers,
    help="Server processes sharing the port (SO_REUSEPORT). auto: one per CPU this process may "
    "use (its affinity mask, capped by a cgroup CPU quota such as a Kubernetes limit).",
)
@option(
    "--http-port",
    type=int,
    default=None,
    help="Also serve HTTP here: the draw-a-digit page at /, Open Inference Protocol REST "
    "(/v2/...) and picture upload (POST /v1/classify). Off unless given; 0 = any free port.",
)
@option(
    "--http-header-timeout",
    "http_header_timeout_s",
    type=float,
    default=_DEFAULTS.http_header_timeout_s,
    had_old_name=False,
    help="Seconds an HTTP connection has to send a request's head, from its opening or its "
    "last response: a slow sender (slowloris) or an idle keep-alive connection is closed then.",
)
@option(
    "--http-max-connections",
    type=int,
    default=_DEFAULTS.http_max_connections,
    help="Open HTTP connections at most. A new one past it closes the one waiting longest "
    "for a request's head (idle, or still sending it); if every one is mid-request, the new "
    "one is closed.",
)
@option(
    "--max-streams-per-connection",
    type=int,
    default=_DEFAULTS.max_streams_per_connection,
    help="gRPC calls and streams at once on one connection (HTTP/2 streams); more are refused "
    "(UNAVAILABLE, which clients retry), so one connection cannot starve the others.",
)
@option(
    "--metrics-port",
    type=int,
    default=_DEFAULTS.metrics_port,
    help="Prometheus /metrics port; 0 picks a free one.",
)
@option(
    "--metrics-host",
    default=_DEFAULTS.metrics_host,
    help="Address of the metrics endpoint. It needs no token, so loopback unless you open it "
    "(0.0.0.0 in containers, where Prometheus scrapes it).",
)
@option("--no-metrics", is_flag=True, help="Serve no metrics endpoint.")
@option(
    "--grace-period",
    "grace_s",
    type=float,
    default=_DEFAULTS.grace_s,
    help="Seconds after SIGTERM (and --drain-delay) to serve calls until they stop arriving "
    "and finish those in progress; what is left then is ended.",
)
@option(
    "--drain-delay",
    "drain_delay_s",
    type=float,
    default=_DEFAULTS.drain_delay_s,
    help="Seconds to keep serving normally after SIGTERM (health already NOT_SERVING) before "
    "draining starts: the time endpoint removal takes to reach clients (Kubernetes: ~5).",
)
@option(
    "--reload-interval",
    "reload_interval_s",
    type=float,
    default=_DEFAULTS.reload_interval_s,
    help="Seconds between checks of the model file or repository for new versions "
    "(hot reload); 0 = off.",
)
@option(
    "--max-connection-age",
    "max_connection_age_s",
    type=float,
    default=_DEFAULTS.max_connection_age_s,
    had_old_name=False,
    help="Seconds before a client connection is closed (GOAWAY), so that it reconnects and may "
    "land on another worker: long-lived connections spread again over --workers; 0 = never.",
)
@option(
    "--max-connection-age-grace",
    "max_connection_age_grace_s",
    type=float,
    default=_DEFAULTS.max_connection_age_grace_s,
    had_old_name=False,
    help="Seconds the calls in progress on such a connection get to finish (streams included).",
)
@option(
    "--tls-cert",
    type=click.Path(path_type=Path),
    help="PEM certificate chain of this server (with --tls-key).",
)
@option("--tls-key", type=click.Path(path_type=Path), help="PEM private key.")
@option(
    "--tls-client-ca",
    type=click.Path(path_type=Path),
    help="PEM CA bundle: require client certificates it signed (mutual TLS).",
)
@option(
    "--auth-token-file",
    type=click.Path(path_type=Path),
    help="File with a bearer token every call (but health checks) must present.",
)
@option(
    "--plaintext",
    is_flag=True,
    help="Serve without TLS. Required when no --tls-cert is given, so it is never an accident.",
)
@option(
    "--http-plaintext",
    is_flag=True,
    help="Serve the HTTP port (--http-port) without TLS although gRPC has it (a proxy in front "
    "terminates TLS). WARNING: bearer tokens and pictures then cross that port in clear.",
)
@option(
    "--log-level",
    # Shown and typed in lowercase like every other choice; logging's names are uppercase.
    type=click.Choice([level.lower() for level in LOG_LEVELS], case_sensitive=False),
    default=_DEFAULTS.log_level.lower(),
)
@option("--log-format", type=click.Choice(LOG_FORMATS), default=_DEFAULTS.log_format)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the versions of digit-server, onnxruntime and grpcio, and exit.",
)
@click.pass_context
def main(ctx: click.Context, no_metrics: bool, **options: object) -> None:
    """Serve a digit-train ONNX model over gRPC with dynamic batching.

    \b
    Examples:
      digit-server --model models/model.onnx --plaintext
      digit-server --model-repository models/repo --version-policy all --plaintext
      digit-server --model m.onnx --tls-cert cert.pem --tls-key key.pem --auth-token-file t
      DIGITS_PLAINTEXT=1 DIGITS_PORT=6000 DIGITS_LOG_FORMAT=json digit-server
    """
    from digit_recognizer.server.supervisor import held_signals

    # Before the heavy imports that validation and start-up begin: a Ctrl-C or SIGTERM from
    # here on ends the start cleanly (exit 0), whenever it comes.
    with held_signals():
        raise SystemExit(_serve(ctx, no_metrics, options))


def _serve(ctx: click.Context, no_metrics: bool, options: dict[str, object]) -> int:
    from digit_recognizer.server.app import run
    from digit_recognizer.server.logs import configure_logging

    given = click.core.ParameterSource.DEFAULT
    problems = []
    if options["model_repository"] is not None and ctx.get_parameter_source("model") != given:
        problems.append("give --model or --model-repository, not both")
    if options["model_control_mode"] == "explicit" and ctx.get_parameter_source("workers") == given:
        options["workers"] = 1  # load and unload requests must reach the one repository
    options["log_level"] = str(options["log_level"]).upper()
    if no_metrics:
        options["metrics_port"] = None
    config = ServerConfig(**options)  # type: ignore[arg-type]
    problems += config.validate()
    if problems:
        raise click.UsageError("\n".join(problems))
    configure_logging(config.log_level, config.log_format)
    log = logging.getLogger("digit_recognizer.server")
    for old, new in ctx.meta.get(_DEPRECATED_USED, []):
        log.warning("%s is a deprecated name: use %s (read this time)", old, new)
    if unknown := unknown_env_vars(os.environ):
        log.warning("unknown settings, ignored: %s", "; ".join(unknown))
    return run(config)


def known_env_vars() -> set[str]:
    """Every variable digit-server reads: DIGITS_ and a flag's name, one per flag."""
    return {p.envvar for p in main.params if isinstance(p, _Option) and isinstance(p.envvar, str)}


def deprecated_env_vars() -> dict[str, str]:
    """Old names still read (with a warning at start) -> the names that replace them."""
    return {
        p.deprecated_envvar: str(p.envvar)
        for p in main.params
        if isinstance(p, _Option) and p.deprecated_envvar
    }


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """DIGITS_* variables that neither digit-server nor digit-client reads, each with the
    closest name the server knows when one is close ("DIGITS_GRACE (did you mean
    DIGITS_GRACE_PERIOD?)"). A typo'd setting is otherwise silently ignored."""
    known = known_env_vars() | set(deprecated_env_vars())
    candidates = sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known)
    if candidates:  # the shell that starts the server may hold digit-client's settings
        candidates = [n for n in candidates if n not in _client_env_vars()]
    # Compared without the prefix that they all share, or every name looks close to all; the
    # cutoff keeps DIGITS_GRACE -> DIGITS_GRACE_PERIOD (0.59) and drops unrelated names (0.5).
    names = {n.removeprefix(ENV_PREFIX): n for n in known_env_vars()}
    described = []
    for name in candidates:
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), names, n=1, cutoff=0.58)
        described.append(f"{name} (did you mean {names[close[0]]}?)" if close else name)
    return described


def _client_env_vars() -> set[str]:
    """The variables digit-client reads (click's auto_envvar_prefix: the group's options as
    DIGITS_<NAME>, a command's as DIGITS_<COMMAND>_<NAME>)."""
    try:
        from digit_recognizer.client.cli import main as client
    except Exception:  # another program's CLI: never a reason for the server not to start
        return set()
    return set(_click_env_vars(client, "DIGITS"))


def _click_env_vars(command: click.Command, prefix: str) -> Iterable[str]:
    for param in command.params:
        if isinstance(param, click.Option):
            envvar = param.envvar
            if envvar:
                yield from [envvar] if isinstance(envvar, str) else envvar
            elif param.name:
                yield f"{prefix}_{param.name.upper()}"
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _click_env_vars(sub, f"{prefix}_{name.upper().replace('-', '_')}")
