"""`digit-train`: fit the MLP, export a verified ONNX model; `digit-train inspect MODEL`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from digit_recognizer.client.versions import version_option
from digit_recognizer.protos.contract import DEFAULT_LABELS, CardError, ModelCard
from digit_recognizer.trainer.config import (
    ACTIVATIONS,
    LOSSES,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRESETS,
)
from digit_recognizer.trainer.data import DATA_DIR_ENV, DataError, load_dataset, resolve_data_dir

DEFAULT_OUTPUT = Path("models/model.onnx")
# TensorFlow's C++ log lines (CPU features, oneDNN, tf.data attribute notes) bury the progress
# lines; real failures still surface as Python exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _TrainByDefault(click.Group):
    """`digit-train [FLAGS]` trains; other words name subcommands (`inspect`). Its --help
    shows the training flags too: they are what `digit-train` is run with."""

    _OWN = ("--help", "-h", "--version")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in self._OWN):
            args = ["train", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "[TRAINING OPTIONS] | COMMAND [ARGS]...")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)  # -h, --version, then the commands
        train = self.commands["train"]
        records = [p.get_help_record(ctx) for p in train.get_params(ctx)]
        with formatter.section("Training options (digit-train [OPTIONS] is digit-train train)"):
            formatter.write_dl([r for r in records if r is not None and r[0] != "-h, --help"])


@click.group(
    cls=_TrainByDefault,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@version_option("digit-train", "tensorflow-cpu|tensorflow", "keras", "tf2onnx", "onnxruntime")
def main() -> None:
    """Train a digit classifier and export it to ONNX (`digit-train [OPTIONS]`), or inspect a
    model.

    \b
    Examples:
      digit-train --data-dir ../shared/mnist                 # train: small CNN + detector, ~1 min
      digit-train --preset notebook --no-detector            # the seed notebook's MLP exactly
      digit-train --preset best --report reports/            # >= 99% with augmentation
      digit-train --hidden 256,256 --optimizer adam --epochs 10
      digit-train inspect models/model.onnx                  # inspect: a model's card
    """


_FLAG_PROBLEMS = "flag problems"  # ctx.meta key: listed with the config's own problems


def _widths(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        # Not raised here: that would hide every other problem of the command line.
        ctx.meta.setdefault(_FLAG_PROBLEMS, []).append(
            f"--{param.name} expects comma-separated integers like "
            f"{'16,32' if param.name == 'conv' else '512 or 1024,1024'}, got {value!r}"
        )
        return None


def _filters(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
    if value is not None and value.strip().lower() in ("", "none"):
        return ()
    return _widths(ctx, param, value)


def _names(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> tuple[str, ...] | None:
    return None if value is None else tuple(part.strip() for part in value.split(","))


@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    envvar=DATA_DIR_ENV,
    show_envvar=True,
    help="Directory with the four MNIST-layout IDX files (.gz or raw) or mnist.npz, "
    "or an .npz file. Without it: ../shared/mnist when it holds the files, else the Keras "
    "download.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_OUTPUT,
    show_default=True,
    help="Where to write the ONNX model.",
)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="default",
    show_default=True,
    help="Starting recipe; any flag below overrides it. notebook: the seed notebook's MLP "
    "exactly; default: a small convolutional net that also learns typed digits; best: the "
    "widest MLP with augmentation.",
)
@click.option(
    "--conv",
    callback=_filters,
    help='3x3 convolution filter counts before the dense layers, e.g. 16,32; "none" for the '
    "notebook's MLP on raw pixels.",
)
@click.option("--hidden", callback=_widths, help="Hidden layer widths, e.g. 512 or 1024,1024.")
@click.option("--activation", type=click.Choice(ACTIVATIONS), help="Hidden-layer activation.")
@click.option("--dropout", type=float, help="Dropout rate after each hidden layer.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS))
@click.option("--learning-rate", type=float, help="Default: the optimizer's Keras default.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES))
@click.option("--loss", type=click.Choice(LOSSES))
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--validation-split", type=float, help="Fraction of training data held out.")
@click.option(
    "--augment/--no-augment", default=None, help="Fresh affine + elastic distortions every epoch."
)
@click.option("--seed", type=int, help="Seed for weights, shuffling and augmentation.")
@click.option(
    "--typed-digits",
    type=int,
    help="Also train the classifier on this many typed digits drawn in the training fonts "
    "(notebook: 0; default: 6000, or one per ten MNIST training images used when fewer, so "
    "a --train-limit run stays quick).",
)
@click.option(
    "--labels",
    callback=_names,
    help='Class names, comma-separated (default "0,...,9"; e.g. Fashion-MNIST names).',
)
@click.option("--name", default="digits-mlp", show_default=True, help="Model name in the card.")
@click.option("--model-version", help="Version in the card (default: UTC time, YYYYMMDDHHMMSS).")
@click.option(
    "--train-limit",
    type=click.IntRange(min=1),
    help="Use only the first N training images (quick experiments, tests).",
)
@click.option(
    "--detector/--no-detector",
    default=True,
    show_default=True,
    help="Also train the not-a-digit detector: a small head beside the classifier (which stays "
    "exactly as trained), exported as the model's second output, digit_score.",
)
@click.option(
    "--detector-pictures",
    type=click.IntRange(min=50),
    help="Made-up pictures of each kind (digits, letters, scribbles, ...) for the detector, "
    "letters and symbols three times over (default: one per 60 training images, 100 to 1000; "
    "cached in ~/.cache/digit-recognizer).",
)
@click.option(
    "--report",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write training curves, confusion matrix, worst errors and the detector's score "
    "histograms as PNGs here.",
)
@click.option(
    "--verbose",
    is_flag=True,
    help="Also show TensorFlow's own start-up messages (oneDNN notices, absl warnings).",
)
@click.option(
    "--if-missing",
    is_flag=True,
    help="Do nothing when --output already holds a valid model (an invalid one is replaced).",
)
def train(
    data_dir: Path | None,
    output: Path,
    preset: str,
    name: str,
    model_version: str | None,
    train_limit: int | None,
    report: Path | None,
    if_missing: bool,
    verbose: bool,
    detector: bool,
    detector_pictures: int | None,
    **knobs: Any,
) -> None:
    """Train the classifier (and its detector) and export a verified ONNX model."""
    started = time.perf_counter()
    if if_missing and output.exists():
        try:
            _, existing = _open_model(output)
        except click.ClickException as exc:
            click.echo(f"replacing {exc.message}")
        else:
            click.echo(f"model: {output} exists (version {existing.version}); not retraining")
            return
    config = replace(PRESETS[preset], **{k: v for k, v in knobs.items() if v is not None})
    if knobs.get("typed_digits") is None and config.labels != DEFAULT_LABELS:
        config = replace(config, typed_digits=0)  # the preset's typed digits are 0-9
    problems = click.get_current_context().meta.get(_FLAG_PROBLEMS, []) + config.validate()
    if problems:
        raise click.UsageError("\n".join(problems))
    try:
        dataset = load_dataset(resolve_data_dir(data_dir))
        dataset.validate_labels(config.num_classes)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    if train_limit is not None:
        dataset = replace(
            dataset, x_train=dataset.x_train[:train_limit], y_train=dataset.y_train[:train_limit]
        )
    click.echo(f"data: {dataset.source} ({len(dataset.x_train)} train, {len(dataset.x_test)} test)")
    if knobs.get("typed_digits") is None:  # the preset's count scales with the data used
        config = replace(config, typed_digits=min(config.typed_digits, len(dataset.x_train) // 10))
    click.echo(f"config: {json.dumps(config.to_dict())}")

    drawing = None
    if detector or config.typed_digits:
        from digit_recognizer.trainer.pictures import default_count, start_drawing

        pictures = (detector_pictures or default_count(len(dataset.x_train))) if detector else 0
        # Started before TensorFlow is imported: the pictures need only MNIST and the fonts,
        # so drawing them in worker processes overlaps the import and the classifier's fit.
        drawing = start_drawing(
            dataset.x_train, config.seed, pictures, click.echo, config.typed_digits
        )
    try:
        # TensorFlow takes seconds to import: only pay for it once the inputs are known good.
        with _native_stderr_silenced(not verbose):
            from digit_recognizer.trainer.export import ParityError, export
            from digit_recognizer.trainer.model import train as fit
            from digit_recognizer.trainer.model import weights_sha256

            typed = drawing.typed_digits() if config.typed_digits and drawing else None
            result = fit(config, dataset, log=click.echo, extra=typed)
            head = None
            if drawing is not None and detector:
                from digit_recognizer.trainer.detector import train_detector

                head = train_detector(
                    result.model, dataset, config.seed, drawing.count, click.echo, drawing
                )
    finally:
        if drawing is not None:
            drawing.close()
    card = ModelCard(
        name=name,
        version=model_version or datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        weights_sha256=weights_sha256(result.model),
        test_accuracy=round(result.test_accuracy, 6),
        test_loss=round(result.test_loss, 6),
        labels=config.labels,
        dataset=json.dumps(dataset.describe(), sort_keys=True),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training_config={**config.to_dict(), "train_images": len(dataset.x_train)},
        library_versions=_library_versions(),
        detector=head.card() if head is not None else {},
    )
    from digit_recognizer.trainer.data import to_model_inputs

    try:
        with _native_stderr_silenced(not verbose):
            parity = export(
                result.model,
                card,
                output,
                to_model_inputs(dataset.x_test),
                result.test_probabilities,
                head,
            )
    except ParityError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"parity: onnxruntime == keras on {parity.images} test images "
        f"(max |diff| {parity.max_abs_diff:.1e}, {parity.argmax_disagreements} "
        "different predictions"
        + (f"; digit score max |diff| {parity.max_score_diff:.1e}" if head is not None else "")
        + ")"
    )
    if report is not None:
        from digit_recognizer.trainer.report import write_report

        paths = write_report(
            report,
            result.history,
            dataset.x_test,
            dataset.y_test,
            result.test_probabilities,
            config.labels,
            head.held_out if head is not None else None,
            head.threshold if head is not None else None,
        )
        click.echo(f"report: {', '.join(str(p) for p in paths)}")
    click.echo(
        f"done: test accuracy {result.test_accuracy:.4f}, loss {result.test_loss:.4f}, "
        f"training {result.train_seconds:.1f} s, total {time.perf_counter() - started:.1f} s\n"
        f"model: {output} (version {card.version}, file sha256 {_file_sha256(output)})"
    )


@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the card as one JSON object.")
def inspect(model: Path, as_json: bool) -> None:
    """Print a model file's card and input/output signature."""
    session, card = _open_model(model)
    signature = {
        "inputs": [
            {"name": i.name, "shape": i.shape, "type": i.type} for i in session.get_inputs()
        ],
        "outputs": [
            {"name": o.name, "shape": o.shape, "type": o.type} for o in session.get_outputs()
        ],
    }
    if as_json:
        click.echo(
            json.dumps(
                {
                    "card": card.to_metadata() | {"labels": list(card.labels)},
                    "signature": signature,
                    "file_sha256": _file_sha256(model),
                }
            )
        )
        return
    click.echo(f"{model}  (file sha256 {_file_sha256(model)})")
    for key, value in card.to_metadata().items():
        click.echo(f"  {key:18} {value}")
    for kind in ("inputs", "outputs"):
        for tensor in signature[kind]:
            click.echo(f"  {kind[:-1]:18} {tensor['name']} {tensor['type']} {tensor['shape']}")


@contextlib.contextmanager
def _native_stderr_silenced(silence: bool) -> Iterator[None]:
    """TensorFlow's C++ side writes its notices straight to file descriptor 2, past
    TF_CPP_MIN_LOG_LEVEL; while it runs, fd 2 goes to /dev/null. This program's own lines
    are on stdout, and its errors are raised, so they are printed after this returns."""
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _open_model(path: Path) -> tuple[Any, ModelCard]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session, ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    except CardError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(f"{path}: not a loadable ONNX model ({first_line})") from None


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in (
        "tensorflow-cpu",
        "tensorflow",
        "keras",
        "tf2onnx",
        "onnx",
        "onnxruntime",
        "numpy",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions
