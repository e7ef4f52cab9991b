"""Client library and `digit-client` CLI.

from digit_recognizer.client import DigitClient
with DigitClient("localhost:50051") as client:
    print(client.classify_image("photo.jpg").digit)
"""

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
    Unauthenticated,
    Unavailable,
)
from digit_recognizer.client.images import to_mnist
from digit_recognizer.client.reading import ReadDigit, Reading, find_digits

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
    "Unauthenticated",
    "Unavailable",
    "find_digits",
    "to_mnist",
]
