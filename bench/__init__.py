"""`make bench`: this server side by side with its compute ceiling, its transport floor and the
serving systems a user would pick instead. Not installed with the package; run from the repo root
as `python -m bench`."""

from __future__ import annotations

from pathlib import Path

import click

# The model every bench entry point measures, spelled once.
model_option = click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default="models/model.onnx",
    show_default=True,
    help="the exported ONNX model",
)
