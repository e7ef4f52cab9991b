"""The trainer end to end: flags, errors, a small real training run, export and parity."""

import json
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from digit_recognizer.protos.contract import ModelCard
from digit_recognizer.trainer.cli import main
from digit_recognizer.trainer.config import BEST, NOTEBOOK
from digit_recognizer.trainer.data import load_dataset, to_model_inputs


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_notebook_model_shape():
    from digit_recognizer.trainer.model import build_model

    model = build_model(NOTEBOOK)
    assert [layer.units for layer in model.layers if hasattr(layer, "units")] == [512, 10]
    assert model.input_shape == (None, 784) and model.output_shape == (None, 10)
    assert build_model(BEST).count_params() == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 10250


def test_the_default_preset_is_a_small_cnn_whose_convolutions_the_detector_shares():
    """The detector's cost beside a convolutional classifier is two dense layers on the
    classifier's own convolutions; beside the notebook's MLP it has convolutions of its own."""
    import keras

    from digit_recognizer.trainer.config import DEFAULT
    from digit_recognizer.trainer.detector import PART, build_head
    from digit_recognizer.trainer.model import build_model

    def convolutions(model: keras.Model) -> list[str]:
        return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]

    cnn = build_model(DEFAULT)
    assert convolutions(cnn) == ["conv_1", "conv_2"] and cnn.output_shape == (None, 10)
    assert convolutions(build_head(cnn).get_layer(PART)) == []
    mlp = build_model(replace(NOTEBOOK, hidden=(8,)))
    assert len(convolutions(build_head(mlp).get_layer(PART))) == 2
    assert "--conv takes at most three" in DEFAULT.__class__(conv=(8,) * 4).validate()[0]


def test_stroke_faces_write_digits_and_a_quarter_of_them_is_held_out():
    from digit_recognizer.client.images import to_mnist
    from digit_recognizer.trainer import pictures as drawn

    fonts, held = drawn.split_fonts(drawn.package_fonts())
    strokes = [f for f in fonts + held if isinstance(f, drawn.StrokeFace)]
    held_strokes = [f for f in held if isinstance(f, drawn.StrokeFace)]
    assert len(strokes) == len(drawn.STROKE_FACES) and len(held_strokes) == len(strokes) // 4
    assert drawn.StrokeFace("cursive") in held  # no script face seen in training is tested on
    rng = np.random.default_rng(0)
    picture = drawn.typed("7", drawn.StrokeFace("futuram"), rng)
    pixels = to_mnist(picture).reshape(28, 28)
    assert pixels.max() == 1.0 and 0.05 < (pixels > 0.5).mean() < 0.4  # a stroke, not a blob


def test_probabilities_stay_output_0_when_the_model_has_a_detector():
    """tf2onnx orders a dict's outputs by key (digit_score first); the export puts them back."""
    from digit_recognizer.protos.contract import SCORE_NAME
    from digit_recognizer.trainer.config import NOTEBOOK
    from digit_recognizer.trainer.detector import Detector, build_head
    from digit_recognizer.trainer.export import to_onnx
    from digit_recognizer.trainer.model import build_model

    classifier = build_model(replace(NOTEBOOK, hidden=(8,)))
    detector = Detector(build_head(classifier), 1.0, 0.0, 0.5, {}, [], {})
    card = ModelCard("m", "1", "0" * 64, 0.9, 0.1, tuple("0123456789"), "{}", "now",
                     detector=detector.card())  # fmt: skip
    session = ort.InferenceSession(
        to_onnx(classifier, card, detector).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == ["probabilities", SCORE_NAME]
    first = session.run(None, {"pixels": np.zeros((3, 784), np.float32)})[0]
    assert first.shape == (3, 10)


def test_bad_flag_is_a_usage_error():
    result = run("--epochs", "0", "--hidden", "0", "--data-dir", "/nowhere")
    assert result.exit_code == 2
    assert "--epochs must be at least 1" in result.output
    assert "--hidden needs one or more positive widths" in result.output
    result = run("--optimizer", "adamax")
    assert result.exit_code == 2 and "Invalid value for '--optimizer'" in result.output
    conv = run("--conv", "16,x", "--data-dir", "/nowhere")
    assert conv.exit_code == 2
    assert "--conv expects comma-separated integers like 16,32" in conv.output
    every = run("--hidden", "abc", "--epochs", "0", "--dropout", "2")
    assert every.exit_code == 2
    for problem in ("--hidden expects comma-separated integers", "--epochs must be at least 1",
                    "--dropout must be in [0, 1)"):  # fmt: skip
        assert problem in every.output, every.output


def test_top_level_help_lists_the_commands_and_the_training_flags():
    result = run("--help")
    assert result.exit_code == 0
    assert "inspect  " in result.output and "train  " in result.output
    assert "digit-train inspect models/model.onnx" in result.output
    for flag in ("--data-dir", "--preset", "--epochs", "--hidden", "--detector / --no-detector"):
        assert flag in result.output, flag
    assert run("train", "--help").exit_code == 0 and run("-h").output == result.output


def test_version_names_the_libraries_without_importing_them():
    import subprocess
    import sys
    from importlib.metadata import version

    code = (
        "import sys\nfrom digit_recognizer.trainer.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as exit:\n    assert not exit.code\n"
        "print(sorted({'tensorflow', 'keras', 'onnxruntime', 'tf2onnx'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    line, imported = done.stdout.splitlines()
    assert done.returncode == 0 and imported == "[]", done.stderr
    assert line.startswith(f"digit-train {version('digit-recognizer')} (")
    assert f"onnxruntime {version('onnxruntime')}" in line and "tensorflow" in line


def test_bad_data_dir_is_one_clear_line(tmp_path):
    result = run("--data-dir", str(tmp_path / "missing"))
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'missing'}: no such file or directory"


def test_labels_must_cover_the_data(idx_dir):
    result = run("--data-dir", str(idx_dir), "--labels", "a,b,c")
    assert result.exit_code == 1 and "only 3 class names" in result.output


def test_small_training_exports_a_verified_self_describing_model(trained_model, mnist_dir):
    output = trained_model
    log = (output.parent / "train.log").read_text()
    assert "parity: onnxruntime == keras on 10000 test images" in log
    assert "0 different predictions" in log
    assert "epoch 2/2: " in log
    for png in (
        "training_curves.png",
        "confusion_matrix.png",
        "worst_errors.png",
        "digit_scores.png",
    ):
        assert (output.parent / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(output.parent.glob(".model.onnx.*"))  # no temp file left behind

    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (inp,), outputs = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("pixels", ["batch", 784], "tensor(float)")
    # Probabilities first: `session.run(None, feed)[0]` is what callers have always done.
    assert [(out.name, out.shape) for out in outputs] == [
        ("probabilities", ["batch", 10]), ("digit_score", ["batch"]),
    ]  # fmt: skip
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    assert card.version == "7" and card.labels == tuple("0123456789")
    assert card.training_config["train_images"] == 6000
    assert card.input_contract["shape"] == [-1, 784]
    assert 0.85 < card.test_accuracy < 1.0
    dataset = load_dataset(mnist_dir)
    (probabilities,) = session.run(
        ["probabilities"], {"pixels": to_model_inputs(dataset.x_test[:500])}
    )
    accuracy = float(np.mean(probabilities.argmax(1) == dataset.y_test[:500]))
    assert accuracy > 0.85

    inspected = run("inspect", str(output), "--json")
    assert inspected.exit_code == 0
    assert json.loads(inspected.output)["signature"]["inputs"][0]["name"] == "pixels"
    assert "weights_sha256" in run("inspect", str(output)).output


def test_if_missing_keeps_a_valid_model_and_replaces_a_broken_one(trained_model, tmp_path):
    kept = run("--if-missing", "-o", str(trained_model), "--data-dir", "/nowhere")
    assert kept.exit_code == 0 and "exists (version 7); not retraining" in kept.output
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"garbage")
    replaced = run("--if-missing", "-o", str(broken), "--data-dir", str(tmp_path / "nodata"))
    assert "replacing " in replaced.output and "not a loadable ONNX model" in replaced.output
    assert replaced.exit_code == 1 and "no such file or directory" in replaced.output


def test_inspect_refuses_a_file_that_is_not_a_model(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00garbage")
    result = run("inspect", str(bogus))
    assert result.exit_code == 1 and result.output.startswith(f"Error: {bogus}: not a loadable")


@pytest.mark.slow
def test_default_training_reproduces_the_notebook(mnist_dir, tmp_path):
    """The full notebook recipe (5 epochs, ~40 s on 2 cores) must reach 0.976."""
    output = tmp_path / "model.onnx"
    result = run(
        "--data-dir", str(mnist_dir), "-o", str(output), "--no-detector", "--preset", "notebook"
    )
    assert result.exit_code == 0, result.output
    assert '"conv": [], "hidden": [512]' in result.output and '"typed_digits": 0' in result.output
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    assert card.test_accuracy >= 0.976, result.output


def test_the_card_says_what_the_data_was_not_where_it_lay(trained_model, mnist_dir):
    import onnxruntime as ort

    session = ort.InferenceSession(str(trained_model), providers=["CPUExecutionProvider"])
    dataset = json.loads(session.get_modelmeta().custom_metadata_map["dataset"])
    assert dataset["name"] == "mnist" and dataset["train_images"] == 6000
    assert dataset["test_images"] == 10000 and len(dataset["files"]) == 4
    assert all(len(digest) == 64 for digest in dataset["files"].values())
    assert str(mnist_dir) not in json.dumps(dataset) and "/" not in json.dumps(dataset)


def test_tensorflow_start_up_noise_is_silenced_unless_verbose(mnist_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    train = str(Path(sys.executable).parent / "digit-train")
    args = [train, "--data-dir", str(mnist_dir), "--train-limit", "300", "--epochs", "1"]
    args += ["--hidden", "8", "-o", str(tmp_path / "m.onnx"), "--detector-pictures", "50"]
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr  # not one line of oneDNN or absl
    assert quiet.stdout.startswith("data: ") and "parity: onnxruntime == keras" in quiet.stdout


def test_typed_digits_can_be_mixed_into_the_classifiers_training(mnist_dir, tmp_path):
    bad = run("--typed-digits", "-1", "--data-dir", str(mnist_dir))
    assert bad.exit_code == 2 and "--typed-digits must be at least 0" in bad.output
    output = tmp_path / "m.onnx"
    args = ["--data-dir", str(mnist_dir), "--train-limit", "300", "--epochs", "1"]
    result = run(*args, "--hidden", "8", "--no-detector", "--typed-digits", "40", "-o", str(output))
    assert result.exit_code == 0, result.output
    assert "drawing 40 typed digits for the classifier" in result.output
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    assert card.training_config["typed_digits"] == 40 and not card.detector


def test_the_default_preset_scales_its_typed_digits_and_conv_none_is_the_mlp(mnist_dir, tmp_path):
    import onnx

    args = ["--data-dir", str(mnist_dir), "--train-limit", "300", "--epochs", "1", "--no-detector"]
    cnn = run(*args, "-o", str(tmp_path / "cnn.onnx"))
    assert cnn.exit_code == 0, cnn.output
    # One typed digit per ten MNIST images used: a --train-limit run stays quick.
    assert '"conv": [16, 32]' in cnn.output and '"typed_digits": 30' in cnn.output
    mlp = run(*args, "--conv", "none", "--hidden", "8", "-o", str(tmp_path / "mlp.onnx"))
    assert mlp.exit_code == 0, mlp.output

    def operators(name: str) -> set[str]:
        return {node.op_type for node in onnx.load(str(tmp_path / name)).graph.node}

    assert "Conv" in operators("cnn.onnx") and "Conv" not in operators("mlp.onnx")
    # Another task's labels: the preset's typed digits (0-9) are left out, not an error.
    labelled = run(*args, "--labels", "a,b,c,d,e,f,g,h,i,j", "-o", str(tmp_path / "l.onnx"))
    assert labelled.exit_code == 0 and '"typed_digits": 0' in labelled.output, labelled.output
