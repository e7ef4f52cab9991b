"""Client library and `digit-client` CLI.

from digit_recognizer.client import DigitClient
with DigitClient("localhost:50051") as client:
    print(client.classify_image("photo.jpg").digit)

Every name below is imported on first use (PEP 562): `import digit_recognizer.client`, and a
`digit-client health` probe, load neither Pillow nor numpy nor scipy; pictures pull in Pillow,
reading numbers scipy, only when asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports
    from digit_recognizer.client.client import (
        AsyncDigitClient,
        Candidate,
        Credentials,
        DigitClient,
        Prediction,
        Telemetry,
    )
    from digit_recognizer.client.errors import (
        DeadlineExceeded,
        DigitClientError,
        ImageError,
        InvalidInput,
        Overloaded,
        ServerError,
        TooManyPieces,
        Unauthenticated,
        Unavailable,
    )
    from digit_recognizer.client.images import to_mnist
    from digit_recognizer.client.reading import ReadDigit, Reading, find_digits

# Each public name and the submodule that defines it.
_HOMES = {
    "AsyncDigitClient": "client",
    "Candidate": "client",
    "Credentials": "client",
    "DigitClient": "client",
    "Prediction": "client",
    "Telemetry": "client",
    "DeadlineExceeded": "errors",
    "DigitClientError": "errors",
    "ImageError": "errors",
    "InvalidInput": "errors",
    "Overloaded": "errors",
    "ServerError": "errors",
    "TooManyPieces": "errors",
    "Unauthenticated": "errors",
    "Unavailable": "errors",
    "to_mnist": "images",
    "ReadDigit": "reading",
    "Reading": "reading",
    "find_digits": "reading",
}

__all__ = [
    "AsyncDigitClient",
    "Candidate",
    "Credentials",
    "DeadlineExceeded",
    "DigitClient",
    "DigitClientError",
    "ImageError",
    "InvalidInput",
    "Overloaded",
    "Prediction",
    "ReadDigit",
    "Reading",
    "ServerError",
    "Telemetry",
    "TooManyPieces",
    "Unauthenticated",
    "Unavailable",
    "find_digits",
    "to_mnist",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:  # AttributeError lets `from digit_recognizer.client import cli` import it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
