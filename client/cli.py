"""`digit-client`: classify pictures, read numbers, read the model card, check health,
measure speed.

The top of this module imports click and grpc only: `digit-client health` is a container's
probe, run every few seconds, and loads nothing else. numpy, Pillow, scipy and rich are
imported inside the commands that use them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

# Before grpc loads: its core's own lines (a TLS handshake that failed, at INFO) would come
# before our one-line error; set GRPC_VERBOSITY to see them.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from click.core import ParameterSource

from digit_recognizer.client.client import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    AsyncDigitClient,
    Credentials,
    DigitClient,
    parse_connections,
)
from digit_recognizer.client.errors import DigitClientError, ImageError
from digit_recognizer.client.versions import version_option
from digit_recognizer.protos.contract import PIXELS_PER_IMAGE

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from digit_recognizer.client.client import Prediction

ENV_PREFIX = "DIGITS"  # every option also reads DIGITS_<OPTION>: DIGITS_TARGET, DIGITS_TOKEN_FILE
CONTEXT = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": ENV_PREFIX}
# ctx.meta key: the connection options typed before the subcommand.
_GIVEN_BEFORE = "digit_recognizer.client.cli.given_before"


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None


_PATH = click.Path(exists=True, dir_okay=False, path_type=Path)
# (name, option settings): the connection options, accepted before the subcommand (as kubectl
# and grpcurl users type them) and after it. What is typed wins over the environment wherever
# it is typed; typed after the subcommand wins over typed before it.
_CONNECTION: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--target", {"default": DEFAULT_TARGET, "help": "Server address; dns:///host:port "
                  "balances over every address."}),
    ("--timeout", {"type": float, "default": DEFAULT_TIMEOUT_S, "help": "Seconds per call."}),
    ("--tls", {"is_flag": True, "help": "Use TLS with the system's root certificates."}),
    ("--ca-cert", {"type": _PATH, "help": "PEM root certificate(s) to verify the server (TLS)."}),
    ("--client-cert", {"type": _PATH, "help": "PEM client certificate (mutual TLS)."}),
    ("--client-key", {"type": _PATH, "help": "PEM client private key (mutual TLS)."}),
    ("--token-file", {"type": _PATH, "help": "File holding a bearer token."}),
)  # fmt: skip
# The model a call is for: only for the commands that call a model (not health, not models).
_MODEL: tuple[tuple[str, dict[str, Any]], ...] = (
    # Not DIGITS_MODEL: that is the server's model file, and a container or shell often has
    # both (a client in the server's environment would ask for a model named like a path).
    ("--model", {"default": "", "envvar": "DIGITS_MODEL_NAME", "allow_from_autoenv": False,
                 "help": "Model to ask (digit-client models lists them); "
                 "default: the server's default."}),
    ("--model-version", {"default": "", "help": "Its version; default: the latest."}),
)  # fmt: skip
_MODEL_COMMANDS = "classify, read, info and bench"


def _parameter_name(option: str) -> str:
    return option.removeprefix("--").replace("-", "_")


def _decorate(function: Callable[..., Any], options: tuple[tuple[str, dict[str, Any]], ...]) -> Any:
    for name, settings in reversed(options):
        shown = "default" in settings and not settings.get("is_flag") and settings["default"] != ""
        function = click.option(name, show_envvar=True, show_default=shown, **settings)(function)
    return function


def connection_options(*, model: bool = True) -> Callable[[Callable[..., Any]], Any]:
    """--target, --timeout, the TLS and token options and (`model`) --model/--model-version,
    turned into `connect`: a DigitClient factory with them all."""
    options = _CONNECTION + (_MODEL if model else ())
    names = [_parameter_name(name) for name, _ in options]

    def decorator(command: Callable[..., Any]) -> Any:
        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            ctx = click.get_current_context()
            before: dict[str, Any] = ctx.meta.get(_GIVEN_BEFORE, {})
            if not model and (typed := [n for n in ("model", "model_version") if n in before]):
                flags = " or ".join("--" + n.replace("_", "-") for n in typed)
                raise click.UsageError(
                    f"{ctx.info_name} takes no {flags}; only {_MODEL_COMMANDS} call a model"
                )
            settings = {}
            for name in names:
                value = kwargs.pop(name)
                # Typed before the subcommand beats the environment and the defaults here.
                if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
                    value = before.get(name, value)
                settings[name] = value
            token_file: Path | None = settings["token_file"]
            credentials = Credentials(
                root_certificates=_read(settings["ca_cert"]),
                private_key=_read(settings["client_key"]),
                certificate_chain=_read(settings["client_cert"]),
                token=token_file.read_text().strip() if token_file else None,
                tls=settings["tls"],
            )
            connect = functools.partial(
                DigitClient,
                target=settings["target"],
                timeout=settings["timeout"],
                credentials=credentials,
                model=settings.get("model", ""),
                model_version=settings.get("model_version", ""),
                # A command's few calls: one connection. `bench` takes --connections.
                connections=1,
            )
            try:
                return command(connect=connect, **kwargs)
            except DigitClientError as exc:
                raise click.ClickException(str(exc)) from None

        return _decorate(wrapper, options)

    return decorator


def _group_options(group: Callable[..., Any]) -> Any:
    return _decorate(group, _CONNECTION + _MODEL)


@click.group(context_settings=CONTEXT)
@version_option("digit-client", "grpcio", "protobuf")
@_group_options
@click.pass_context
def main(ctx: click.Context, **options: Any) -> None:
    """Classify handwritten digits and read numbers with a digit-server.

    \b
    Examples:
      digit-client classify examples/*.png
      digit-client classify photo.jpg --show --top-k 3
      digit-client classify --json scans/ > answers.jsonl
      digit-client read house-number.jpg
      digit-client info
      digit-client models
      digit-client health && echo ready
      digit-client bench --concurrency 64 --duration 10
      digit-client --target server:50051 --token-file t info

    The connection options work before the subcommand and after it. Typed options beat the
    environment (DIGITS_TARGET, DIGITS_TOKEN_FILE, ...); typed after the subcommand beats
    typed before it.
    """
    # Only what was typed travels on: a default or an environment variable here is the same
    # default or variable the subcommand reads itself.
    ctx.meta[_GIVEN_BEFORE] = {
        name: value
        for name, value in options.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }


def _expand(paths: tuple[str, ...]) -> list[str]:
    from digit_recognizer.client.images import is_image_file

    expanded: list[str] = []
    for raw in paths:
        path = Path(raw)
        if raw != "-" and path.is_dir():
            found = [str(p) for p in sorted(path.iterdir()) if p.is_file() and is_image_file(p)]
            if not found:  # silence and exit 0 read as "done" to a script
                raise click.ClickException(f"{raw}: a folder with no pictures in it")
            expanded.extend(found)
        else:
            expanded.append(raw)
    return expanded


@main.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--top-k", type=click.IntRange(0, 10), default=0, help="Also list the K best classes."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image per line.")
@click.option("--show", is_flag=True, help="Draw the 28x28 image the model sees.")
@connection_options()
def classify(
    connect: Callable[[], DigitClient],
    images: tuple[str, ...],
    top_k: int,
    as_json: bool,
    show: bool,
) -> None:
    """Classify pictures: files, directories of pictures, or - for standard input.

    Any picture Pillow reads works: photos of ink on paper, scans, drawings on a transparent
    canvas. Each is turned into an MNIST-style 28x28 digit first (see --show). Exit status 1
    when any picture could not be classified; the others are still printed.

    \b
    Examples:
      digit-client classify examples/*
      digit-client classify photo.jpg --show --top-k 3
      digit-client classify --json scans/ > answers.jsonl
      cat digit.png | digit-client classify -
    """
    import numpy as np

    from digit_recognizer.client.images import quantized, render, to_mnist

    failures = 0
    prepared: list[tuple[str, np.ndarray]] = []
    for name in _expand(images):
        try:
            source = sys.stdin.buffer.read() if name == "-" else Path(name)
            prepared.append((name, to_mnist(source, name="<stdin>" if name == "-" else name)))
        except ImageError as exc:
            failures += 1
            click.echo(f"Error: {exc}", err=True)
    if prepared:
        with connect() as client:
            pixels = quantized(np.stack([p for _, p in prepared]))  # pictures are 8-bit
            predictions = client.classify_many(pixels, top_k=top_k)
        for (name, pixels), prediction in zip(prepared, predictions, strict=True):
            if show:
                # JSON lines stay JSON: the picture goes to stderr then. Colour half-blocks
                # only for a terminal; text anywhere else.
                out = sys.stderr if as_json else sys.stdout
                click.echo("\n".join(render(pixels, ascii_only=not out.isatty())), err=as_json)
            click.echo(_format(name, prediction, as_json))
    if failures:
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per picture per line.")
@connection_options()
def read(connect: Callable[[], DigitClient], images: tuple[str, ...], as_json: bool) -> None:
    """Read numbers: pictures holding several digits (a house number, a meter, a year).

    The digits are found in the picture (connected ink, broken strokes merged, touching
    digits split), ordered left to right and classified in one request. Pieces the model
    says are not digits are left out of the number and reported. Exit status 1 when any
    picture could not be read.

    \b
    Examples:
      digit-client read house-number.jpg
      digit-client read --json meters/ > readings.jsonl
    """
    from digit_recognizer.client.reading import Cut, assemble, find_digits, pixels_u8

    failures = 0
    found: list[tuple[str, Cut]] = []
    for name in _expand(images):
        try:
            source = sys.stdin.buffer.read() if name == "-" else Path(name)
            found.append((name, find_digits(source, "<stdin>" if name == "-" else name)))
        except ImageError as exc:
            failures += 1
            click.echo(f"Error: {exc}", err=True)
    # Every piece of every picture, and the other ways to cut ambiguous ink: one request.
    everything = [piece for _, cut in found for piece in cut.asked()]
    predictions = []
    if everything:
        with connect() as client:
            predictions = client.classify_many(pixels_u8(everything))
    answers = iter(predictions)
    readings = [(name, assemble(cut, [next(answers) for _ in cut.asked()])) for name, cut in found]
    for name, reading in readings:
        if as_json:
            click.echo(json.dumps({"path": name, **reading.to_dict()}))
            continue
        if reading.text:
            line = f"{name}: {reading.text}"
            if reading.dropped:
                line += f"  ({len(reading.dropped)} piece(s) that are not digits left out)"
        else:
            line = f"{name}: no digits found" + (f", {reading.reason}" if reading.reason else "")
        click.echo(line)
    if failures:
        sys.exit(1)


def _format(name: str, prediction: Prediction, as_json: bool) -> str:
    if as_json:
        return json.dumps({"path": name, **prediction.to_dict()})
    if not prediction.looks_like_a_digit:
        return f"{name}: not a digit (score {prediction.digit_score:.2f})"
    line = f"{name}: {prediction.label} ({prediction.confidence:.3f})"
    if prediction.top:
        line += "  top: " + ", ".join(f"{c.label} {c.probability:.3f}" for c in prediction.top)
    return line


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the model info as JSON.")
@connection_options()
def info(connect: Callable[[], DigitClient], as_json: bool) -> None:
    """The served model's card (with its not-a-digit detector and the library versions it was
    built with, when the server reports them), the execution provider and the batching limits.

    \b
    Examples:
      digit-client info
      digit-client info --json | jq .test_accuracy
      digit-client info --json | jq .training_config.epochs
    """
    with connect() as client:
        model = client.model_info()
    data = typed_dict(model)
    if as_json:
        click.echo(json.dumps(data))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model.name} {model.version}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # sha256 values are read whole, never cut with "…"
    for key, value in data.items():
        table.add_row(key, _cell(value))
    Console().print(table)


def typed_dict(message: Message) -> dict[str, Any]:
    """A reply as the JSON a reader expects. protobuf's JSON mapping writes 64-bit integers as
    strings (a shape of ["-1", "784"]): here they are numbers. Fields named `*_json`, and
    strings holding a JSON object (the card's `dataset`), are parsed into what they hold,
    `*_json` under the name without the suffix; an empty one is null."""
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    typed: dict[str, Any] = {}
    for key, value in _typed_fields(data, message.DESCRIPTOR).items():
        if key.endswith("_json") and isinstance(value, str):
            typed[key.removesuffix("_json")] = json.loads(value) if value else None
        elif isinstance(value, str) and value.startswith("{"):
            try:
                typed[key] = json.loads(value)
            except ValueError:  # text that only starts like JSON stays text
                typed[key] = value
        else:
            typed[key] = value
    return typed


def _typed_fields(data: dict[str, Any], descriptor: Any) -> dict[str, Any]:
    """`data` in the message's field order (MessageToDict puts default values last), with
    64-bit integers as numbers again, in nested messages too."""
    from google.protobuf.descriptor import FieldDescriptor

    wide = {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
    typed: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in wide:
            value = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if isinstance(value, list):
                value = [_typed_fields(item, field.message_type) for item in value]
            else:
                value = _typed_fields(value, field.message_type)
        typed[field.name] = value
    return typed


def _cell(value: Any) -> str:
    """A value for the info table: objects one `key: value` line each, the rest as JSON."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if not value:
            return "none"
        return "\n".join(
            f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()
        )
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)  # the labels
    return json.dumps(value)


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version per line.")
@connection_options(model=False)
def models(connect: Callable[[], DigitClient], as_json: bool) -> None:
    """The server's models and versions: READY (served) or UNAVAILABLE (and why).

    \b
    Examples:
      digit-client models
      digit-client classify seven.png --model best --model-version 2
    """
    with connect() as client:
        listed = client.list_models()
    for status in listed.models:
        default = status.model == listed.default_model
        if as_json:
            entry = {"model": status.model, "version": status.version, "state": status.state}
            click.echo(json.dumps(entry | {"reason": status.reason, "default": default}))
        else:
            mark = " (default)" if default else ""
            why = f"  {status.reason}" if status.reason else ""
            click.echo(f"{status.model}{mark}\t{status.version}\t{status.state}{why}")


@main.command(context_settings=CONTEXT)
@click.option("--service", default="", help='Service to check ("" = the whole server).')
@connection_options(model=False)
def health(connect: Callable[[], DigitClient], service: str) -> None:
    """Print the health status; exit 0 only when SERVING (a container healthcheck).

    \b
    Examples:
      digit-client health && echo ready
      digit-client health --service digits.v1.DigitClassifier --target server:50051
    """
    with connect() as client:
        status = client.health(service)
    click.echo(status)
    if status != "SERVING":
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Calls in flight at once.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to run (ignored with --count).",
)
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many requests.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Images per request.",
)
@click.option(
    "--encoding",
    type=click.Choice(["f32", "u8", "packed"]),
    default="f32",
    show_default=True,
    help="Wire encoding: raw float32 bytes, uint8 bytes, or repeated float.",
)
@click.option(
    "--protocol",
    type=click.Choice(["digits", "v2"]),
    default="digits",
    show_default=True,
    help="digits.v1 Classify, or the Open Inference Protocol's ModelInfer (raw FP32).",
)
@click.option(
    "--connections",
    default="auto",
    show_default=True,
    help="TCP connections: auto (one to each process of a --workers N server, calls "
    "balanced over them) or a number (1: one connection, one server process).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@connection_options()
def bench(
    connect: functools.partial[DigitClient],
    concurrency: int,
    duration: float,
    count: int | None,
    batch_size: int,
    encoding: str,
    protocol: str,
    connections: str,
    as_json: bool,
) -> None:
    """Measure throughput and latency under a closed-loop load of real requests.

    \b
    Examples:
      digit-client bench --concurrency 64 --duration 10
      digit-client bench --batch-size 256 --concurrency 4 --count 1000 --json
    """
    try:
        pool = parse_connections(connections)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--connections") from None
    client_args = {**connect.keywords, "connections": pool}
    result = asyncio.run(
        _bench(
            client_args,
            concurrency,
            duration,
            count,
            batch_size,
            encoding,
            protocol,
            show_progress=not as_json,
        )
    )
    if as_json:
        click.echo(json.dumps(result))
    else:
        _print_bench(result)
    if result["errors"]:
        sys.exit(1)  # a benchmark whose calls failed measured something else


def _print_bench(result: dict[str, Any]) -> None:
    click.echo(
        f"{result['requests']} requests ({result['images']} images) in {result['seconds']:.2f} s: "
        f"{result['requests_per_s']:.0f} requests/s, {result['images_per_s']:.0f} images/s\n"
        f"latency ms: p50 {result['p50_ms']:.2f}, p90 {result['p90_ms']:.2f}, "
        f"p99 {result['p99_ms']:.2f}, max {result['max_ms']:.2f}"
        + (f"\nerrors: {result['errors']}" if result["errors"] else "")
        + _per_worker(result)
    )


def _per_worker(result: dict[str, Any]) -> str:
    """ ", over 2 connections: worker 0 5,012 requests, worker 1 4,987" (digits.v1 replies)."""
    counts = result.get("requests_per_worker") or {}
    if len(counts) < 2:
        return ""
    shares = ", ".join(f"worker {w} {n:,}" for w, n in counts.items())
    return f"\nover {result['connections']} connections: {shares}"


async def _bench(
    client_args: dict[str, Any],
    concurrency: int,
    duration: float,
    count: int | None,
    batch_size: int,
    encoding: str,
    protocol: str,
    show_progress: bool,
) -> dict[str, Any]:
    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from digit_recognizer.protos import digits_pb2, inference_pb2, inference_pb2_grpc

    rng = np.random.default_rng(0)
    pixels = rng.random((batch_size, PIXELS_PER_IMAGE), dtype=np.float32)
    if encoding == "u8":
        request = digits_pb2.ClassifyRequest(pixels_u8=(pixels * 255).astype(np.uint8).tobytes())
    elif encoding == "packed":
        request = digits_pb2.ClassifyRequest(pixels=pixels.ravel())
    else:
        request = digits_pb2.ClassifyRequest(pixels_f32le=pixels.astype("<f4").tobytes())
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    answered: Counter[int] = Counter()  # requests per server process (digits.v1 replies say)
    issued = 0
    async with AsyncDigitClient(**client_args) as client:
        await client.model_info()
        await client.connect()  # every connection open before the clock starts
        timeout = client.timeout
        method: Any = lambda slot: slot.stub.Classify  # noqa: E731
        request.model, request.model_version = client.model, client.model_version
        if protocol == "v2":
            info = await client.model_info()
            tensor = inference_pb2.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="FP32", shape=[batch_size, PIXELS_PER_IMAGE]
            )
            request = inference_pb2.ModelInferRequest(
                model_name=info.model,
                model_version=client.model_version,
                inputs=[tensor],
                raw_input_contents=[pixels.astype("<f4").tobytes()],
            )
            stubs: dict[int, Any] = {}

            def method(slot: Any) -> Any:
                if id(slot) not in stubs:
                    stubs[id(slot)] = inference_pb2_grpc.GRPCInferenceServiceStub(slot.channel)
                return stubs[id(slot)].ModelInfer

        started = time.perf_counter()
        stop_at = started + (float("inf") if count else duration)
        total = count or duration

        with Progress(
            TextColumn("bench"),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            transient=True,
            disable=not show_progress or not sys.stderr.isatty(),
            console=Console(stderr=True),  # stdout holds the result alone
        ) as bar:
            task = bar.add_task("", total=total)

            async def worker() -> None:
                nonlocal issued
                while time.perf_counter() < stop_at and (count is None or issued < count):
                    issued += 1
                    sent = time.perf_counter()
                    slot = client._acquire()  # the pool's connection for this call
                    try:
                        # The call's metadata carries the token (and trace context), as
                        # every other command's calls do.
                        reply = await method(slot)(
                            request, timeout=timeout, metadata=client._metadata
                        )
                        latencies.append(time.perf_counter() - sent)
                        if protocol == "digits":
                            answered[reply.telemetry.worker] += 1
                            client._heard(slot, reply.telemetry)
                    except grpc.aio.AioRpcError as exc:  # counted by code, never fatal
                        errors[exc.code().name] += 1
                    finally:
                        await client._release(slot)
                    done = len(latencies) + sum(errors.values())
                    bar.update(
                        task,
                        completed=done if count else time.perf_counter() - started,
                        description=f"{done} requests",
                    )

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        connections = client.open_connections
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "concurrency": concurrency,
        "batch_size": batch_size,
        "encoding": encoding,
        "protocol": protocol,
        "requests": len(latencies),
        "images": len(latencies) * batch_size,
        "seconds": seconds,
        "requests_per_s": len(latencies) / seconds,
        "images_per_s": len(latencies) * batch_size / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "errors": dict(errors),
        "connections": connections,
        "requests_per_worker": {str(w): n for w, n in sorted(answered.items())},
    }
