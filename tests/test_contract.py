import pytest

from digit_recognizer.protos.contract import CardError, ModelCard

CARD = ModelCard(
    name="digits-mlp",
    version="20261125120000",
    weights_sha256="ab" * 32,
    test_accuracy=0.9812,
    test_loss=0.0612,
    labels=("zero", "one"),
    dataset="mnist",
    created_at="2026-11-25T12:00:00+00:00",
    training_config={"hidden": [512], "epochs": 5},
    library_versions={"onnx": "1.23.2"},
)


def test_card_round_trips_through_string_metadata():
    metadata = CARD.to_metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    assert ModelCard.from_metadata(metadata) == CARD


def test_incomplete_or_malformed_card_is_refused():
    metadata = CARD.to_metadata()
    with pytest.raises(CardError, match="missing version"):
        ModelCard.from_metadata({k: v for k, v in metadata.items() if k != "version"})
    with pytest.raises(CardError, match="'test_accuracy' is malformed"):
        ModelCard.from_metadata(metadata | {"test_accuracy": "high"})
    with pytest.raises(CardError, match="'labels' is malformed"):
        ModelCard.from_metadata(metadata | {"labels": "[0, 1"})
