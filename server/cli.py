"""`digit-server`: serve an ONNX model over gRPC. Every flag is also a DIGITS_* variable."""

from __future__ import annotations

from pathlib import Path

import click

from digit_recognizer.server.config import LOG_FORMATS, LOG_LEVELS, ServerConfig
from digit_recognizer.server.cpus import available_cpus

_DEFAULTS = ServerConfig(model=Path("models/model.onnx"))


def _workers(_ctx: click.Context, _param: click.Parameter, value: str | int) -> int:
    if value == "auto":
        return available_cpus()
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"must be a whole number or auto, got {value!r}") from None


@click.command(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "auto_envvar_prefix": "DIGITS",
        "show_default": True,
    }
)
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=_DEFAULTS.model,
    show_envvar=True,
    help="The ONNX model written by digit-train: a repository of one model, named and "
    "versioned by its model card. Replace the file to serve a new version.",
)
@click.option(
    "--model-repository",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    show_envvar=True,
    help="Serve every model of DIR/<name>/<version>/model.onnx (Triton's layout; versions "
    "are positive integers) instead of --model. Watched: versions come and go while serving.",
)
@click.option(
    "--version-policy",
    default=_DEFAULTS.version_policy,
    show_envvar=True,
    help="Which versions of each repository model are served: latest, all, or specific:1,3.",
)
@click.option(
    "--default-model",
    default=_DEFAULTS.default_model,
    show_envvar=True,
    help="The model that calls naming none get. Default: the first name in the repository.",
)
@click.option(
    "--host",
    default=_DEFAULTS.host,
    show_envvar=True,
    help="Address to listen on ([::] = every interface, IPv4 and IPv6).",
)
@click.option(
    "--port",
    type=int,
    default=_DEFAULTS.port,
    show_envvar=True,
    help="gRPC port; 0 picks a free one (logged at start).",
)
@click.option(
    "--provider",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_envvar=True,
    help="onnxruntime execution provider. auto: CUDA when it really works, else CPU; "
    "cuda: refuse to start without it.",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=_DEFAULTS.max_batch_size,
    show_envvar=True,
    help="Images per model run.",
)
@click.option(
    "--max-delay-us",
    type=int,
    default=_DEFAULTS.max_delay_us,
    show_envvar=True,
    help="Longest wait for a batch to fill, from the oldest queued image; "
    "0 = run at once when the model is free.",
)
@click.option(
    "--max-queue-size",
    type=int,
    default=_DEFAULTS.max_queue_size,
    show_envvar=True,
    help="Images queued before new requests get RESOURCE_EXHAUSTED.",
)
@click.option(
    "--inline-max-us",
    type=int,
    default=_DEFAULTS.inline_max_us,
    show_envvar=True,
    help="Model runs expected (from the last run) to take at most this many microseconds "
    "execute on the event loop thread, cheaper than a thread hand-off; longer ones on a "
    "worker thread. 0 = always the worker thread.",
)
@click.option(
    "--max-images-per-request",
    type=int,
    default=_DEFAULTS.max_images_per_request,
    show_envvar=True,
    help="Larger requests get INVALID_ARGUMENT.",
)
@click.option(
    "--intra-op-threads",
    type=int,
    default=_DEFAULTS.intra_op_threads,
    show_envvar=True,
    help="onnxruntime threads per model run; 0 = its default.",
)
@click.option(
    "--spin-wait/--no-spin-wait",
    default=_DEFAULTS.spin_wait,
    show_envvar=True,
    help="Let onnxruntime threads spin between runs: faster large batches, less CPU left for gRPC.",
)
@click.option(
    "--allow-tf32/--no-allow-tf32",
    default=_DEFAULTS.allow_tf32,
    show_envvar=True,
    help="CUDA: let matrix products run in TF32 (faster; probabilities then differ from the "
    "CPU's by ~1e-3, beyond the 1e-5 the export is verified to). Off: full float32.",
)
@click.option(
    "--workers",
    default="auto",
    show_default=True,
    show_envvar=True,
    callback=_workers,
    help="Server processes sharing the port (SO_REUSEPORT). auto: one per CPU this process may "
    "use (its affinity mask, capped by a cgroup CPU quota such as a Kubernetes limit).",
)
@click.option(
    "--http-port",
    type=int,
    default=None,
    show_envvar=True,
    help="Also serve HTTP here: the draw-a-digit page at /, Open Inference Protocol REST "
    "(/v2/...) and picture upload (POST /v1/classify). Off unless given; 0 = any free port.",
)
@click.option(
    "--metrics-port",
    type=int,
    default=_DEFAULTS.metrics_port,
    show_envvar=True,
    help="Prometheus /metrics port; 0 picks a free one.",
)
@click.option(
    "--metrics-host",
    default=_DEFAULTS.metrics_host,
    show_envvar=True,
    help="Address of the metrics endpoint. It needs no token, so loopback unless you open it "
    "(0.0.0.0 in containers, where Prometheus scrapes it).",
)
@click.option("--no-metrics", is_flag=True, show_envvar=True, help="Serve no metrics endpoint.")
@click.option(
    "--grace-period",
    "grace_s",
    type=float,
    default=_DEFAULTS.grace_s,
    show_envvar=True,
    help="Seconds after SIGTERM (and --drain-delay) to serve calls until they stop arriving "
    "and finish those in progress; what is left then is ended.",
)
@click.option(
    "--drain-delay",
    "drain_delay_s",
    type=float,
    default=_DEFAULTS.drain_delay_s,
    show_envvar=True,
    help="Seconds to keep serving normally after SIGTERM (health already NOT_SERVING) before "
    "draining starts: the time endpoint removal takes to reach clients (Kubernetes: ~5).",
)
@click.option(
    "--reload-interval",
    "reload_interval_s",
    type=float,
    default=_DEFAULTS.reload_interval_s,
    show_envvar=True,
    help="Seconds between checks of the model file or repository for new versions "
    "(hot reload); 0 = off.",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path),
    show_envvar=True,
    help="PEM certificate chain of this server (with --tls-key).",
)
@click.option(
    "--tls-key", type=click.Path(path_type=Path), show_envvar=True, help="PEM private key."
)
@click.option(
    "--tls-client-ca",
    type=click.Path(path_type=Path),
    show_envvar=True,
    help="PEM CA bundle: require client certificates it signed (mutual TLS).",
)
@click.option(
    "--auth-token-file",
    type=click.Path(path_type=Path),
    show_envvar=True,
    help="File with a bearer token every call (but health checks) must present.",
)
@click.option(
    "--plaintext",
    is_flag=True,
    show_envvar=True,
    help="Serve without TLS. Required when no --tls-cert is given, so it is never an accident.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=_DEFAULTS.log_level,
    show_envvar=True,
)
@click.option(
    "--log-format", type=click.Choice(LOG_FORMATS), default=_DEFAULTS.log_format, show_envvar=True
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
    from digit_recognizer.server.app import StartupError, run
    from digit_recognizer.server.logs import configure_logging

    given = click.core.ParameterSource.DEFAULT
    if options["model_repository"] is not None and ctx.get_parameter_source("model") != given:
        raise click.UsageError("give --model or --model-repository, not both")
    options["log_level"] = str(options["log_level"]).upper()
    if no_metrics:
        options["metrics_port"] = None
    config = ServerConfig(**options)  # type: ignore[arg-type]
    problems = config.validate()
    if problems:
        raise click.UsageError("\n".join(problems))
    configure_logging(config.log_level, config.log_format)
    try:
        code = run(config)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    raise SystemExit(code)
