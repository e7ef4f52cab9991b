"""Not a digit, and whole numbers: the detector's output through every front, and the reader
on pictures the tests draw (blank page, one digit, touching digits, a broken stroke, a letter
among digits)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFont

from digit_recognizer.client import AsyncDigitClient, find_digits
from digit_recognizer.client.cli import main as client_main
from digit_recognizer.client.reading import NOT_DIGITS, Alternative, Cut, Piece, choose
from digit_recognizer.protos import digits_pb2, digits_pb2_grpc, inference_pb2_grpc
from digit_recognizer.protos import inference_pb2 as v2
from digit_recognizer.protos.contract import SCORE_NAME, ModelCard
from digit_recognizer.server import metrics
from digit_recognizer.trainer import pictures as drawn
from digit_recognizer.trainer.data import load_dataset

from onnx_models import one_hot_image


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_dataset(mnist_dir)


def digit_of(mnist, label: int, nth: int = 0) -> np.ndarray:
    return mnist.x_test[np.flatnonzero(mnist.y_test == label)[nth]]


def number(mnist, labels: list[int], gap: int) -> Image.Image:
    """MNIST test digits side by side on white paper, `gap` pixels apart at 28-pixel scale
    (MNIST frames hold ~4 px of margin each side: -8 makes the digits touch)."""
    width = 28 * len(labels) + gap * (len(labels) - 1)
    canvas = np.zeros((28, width), np.uint8)
    for i, label in enumerate(labels):
        x = i * (28 + gap)
        canvas[:, x : x + 28] = np.maximum(canvas[:, x : x + 28], digit_of(mnist, label))
    big = Image.fromarray(255 - canvas).resize((width * 5, 140), Image.Resampling.BICUBIC)
    paper = Image.new("L", (big.width + 80, 220), 255)
    paper.paste(big, (40, 40))
    return paper


def test_a_blank_page_has_no_digits():
    assert find_digits(Image.new("L", (300, 200), 250)) == []


def test_one_digit_is_one_piece(mnist):
    (piece,) = find_digits(number(mnist, [7], 0))
    left, top, right, bottom = piece.box
    assert 40 <= left < right <= 180 and 40 <= top < bottom <= 180
    assert piece.pixels.shape == (784,) and piece.pixels.max() == pytest.approx(1.0)


@pytest.mark.parametrize("gap", [6, 0, -8])
def test_digits_are_found_left_to_right_even_touching(mnist, gap):
    pieces = find_digits(number(mnist, [2, 0, 2, 6], gap))
    assert len(pieces) == 4
    lefts = [p.box[0] for p in pieces]
    assert lefts == sorted(lefts)


def test_a_digit_with_a_broken_stroke_is_one_piece():
    """A 5 whose bar was drawn apart from its body: two pieces of ink, one digit."""
    paper = Image.new("L", (260, 260), 255)
    draw = ImageDraw.Draw(paper)
    draw.line([(90, 50), (180, 50)], fill=0, width=14)  # the bar, not touching the body
    draw.line([(92, 68), (88, 120)], fill=0, width=14)
    draw.arc([(70, 100), (190, 210)], start=200, end=160, fill=0, width=14)
    assert len(find_digits(paper)) == 1


def in_uneven_light(picture: Image.Image) -> Image.Image:
    """The picture under a lamp that leaves a soft dark patch low on the left, over the
    first digits (paper and ink alike get less light)."""
    pixels = np.asarray(picture, np.float32)
    height, width = pixels.shape
    y, x = np.mgrid[:height, :width]
    patch = ((x - 0.3 * width) / (0.12 * width)) ** 2 + ((y - 0.8 * height) / (0.25 * height)) ** 2
    return Image.fromarray((pixels * (1 - 0.4 * np.exp(-patch))).astype(np.uint8))


def test_uneven_light_makes_no_pieces_of_its_own(mnist):
    pieces = find_digits(in_uneven_light(number(mnist, [2, 0, 2, 6], 6)))
    assert len(pieces) == 4
    assert all(bottom - top < 120 for _, top, _, bottom in (p.box for p in pieces))


def wide_zero() -> Image.Image:
    """A "0" in a wide face, 1.3 times as wide as tall: one digit, alone."""
    paper = Image.new("L", (300, 200), 250)
    ImageDraw.Draw(paper).ellipse([50, 50, 180, 150], outline=20, width=14)
    return paper


def test_a_wide_digit_alone_is_one_piece():
    (piece,) = find_digits(wide_zero())
    assert piece.box[2] - piece.box[0] > piece.box[3] - piece.box[1]


def scattered_dots() -> Image.Image:
    paper = Image.new("L", (300, 300), 245)
    draw, rng = ImageDraw.Draw(paper), np.random.default_rng(0)
    for _ in range(25):
        (x, y), r = rng.uniform(20, 280, 2), rng.uniform(6, 14)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=30)
    return paper


def wavy_line() -> Image.Image:
    paper = Image.new("L", (400, 160), 245)
    xs = np.linspace(0, 400, 200)
    ImageDraw.Draw(paper).line(list(zip(xs, 80 + 25 * np.sin(xs / 30), strict=True)), 20, 10)
    return paper


def test_ink_not_laid_out_as_a_number_says_why(mnist):
    assert "scattered" in find_digits(scattered_dots()).not_a_number
    assert "lines run across" in find_digits(wavy_line()).not_a_number
    assert find_digits(number(mnist, [2, 0, 2, 6], -4)).not_a_number is None


def test_the_model_decides_how_ambiguous_ink_is_cut():
    """Pieces 1-2 are a wide piece the reader cut in two; the alternative leaves it whole."""
    piece = Piece((0, 0, 1, 1), np.zeros(784, np.float32))
    cut = Cut([piece, piece, piece], [Alternative(1, 3, (piece,))])
    assert len(cut.asked()) == 4
    # Half of the cut fails the detector, whole it is a digit: whole.
    assert choose(cut, [(True, 0.9), (True, 0.8), (False, 0.1), (True, 0.7)]) == ([0, 3], None)
    # A cut the model accepts stands, however strong the other way.
    assert choose(cut, [(True, 0.9), (True, 0.6), (True, 0.6), (True, 0.99)])[0] == [0, 1, 2]
    # Verdicts for the reader's own pieces only (a caller that did not ask): its cut.
    assert choose(cut, [(True, 0.9), (True, 0.8), (False, 0.1)])[0] == [0, 1, 2]
    # One piece the model rejects stays one thing that is not a digit, however its halves
    # read (a typed "A" cut in two read as "11").
    lone = Cut([piece], [Alternative(0, 1, (piece, piece))])
    assert choose(lone, [(False, 0.01), (True, 0.8), (True, 0.9)]) == ([0], NOT_DIGITS)


def letter_among_digits(mnist) -> Image.Image:
    """3, a big typed W (Pillow's own font: the same on every machine), 7."""
    paper = number(mnist, [3, 0, 7], 10)
    middle = Image.new("L", (140, 140), 255)
    ImageDraw.Draw(middle).text((10, 0), "W", fill=0, font=ImageFont.load_default(size=120))
    paper.paste(Image.new("L", (140, 140), 255), (40 + 38 * 5, 40))
    paper.paste(middle, (40 + 38 * 5, 40))
    return paper


def test_the_trained_model_has_a_calibrated_detector_beside_the_unchanged_classifier(
    trained_model,
):
    session = ort.InferenceSession(str(trained_model), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    assert {o.name for o in session.get_outputs()} == {"probabilities", SCORE_NAME}
    assert 0 < card.digit_threshold < 1 and card.detector["calibration"]["method"] == "platt"
    kept = [v for v in card.detector["validation"].values() if v["is_digit"]]
    assert all(v["share_right"] >= 0.95 for v in kept), card.detector["validation"]
    # The faces come from the install, not the machine: the trainer image draws the same ones.
    fonts, _ = drawn.split_fonts(drawn.package_fonts())
    assert card.detector["fonts"] == drawn.font_names(fonts)
    assert len(fonts) > 15 and "DejaVuSans.ttf" in card.detector["fonts"]
    pixels = np.stack([one_hot_image(3), np.zeros(784, np.float32)])
    probabilities, scores = session.run(["probabilities", SCORE_NAME], {"pixels": pixels})
    assert probabilities.shape == (2, 10) and scores.shape == (2,)
    assert scores[1] < card.digit_threshold  # a blank input is not a digit


async def test_every_front_says_whether_it_is_a_digit(start_server, trained_model, mnist):
    server = await start_server(trained_model, http_port=0)
    digit = (digit_of(mnist, 4) / 255.0).astype(np.float32).reshape(1, 784)
    blank = np.zeros((1, 784), np.float32)
    both = np.concatenate([digit, blank])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await digits_pb2_grpc.DigitClassifierStub(channel).Classify(
            digits_pb2.ClassifyRequest(pixels_f32le=both.tobytes())
        )
        first, second = reply.predictions
        assert first.is_digit and first.digit == 4 and first.digit_score > second.digit_score
        assert second.HasField("is_digit") and not second.is_digit
        v2_stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        meta = await v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="digits-mlp"))
        assert [(o.name, o.datatype) for o in meta.outputs] == [
            ("probabilities", "FP32"), (SCORE_NAME, "FP32"), ("is_digit", "BOOL"),
        ]  # fmt: skip
        tensor = v2.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="FP32", shape=[2, 784]
        )
        request = v2.ModelInferRequest(
            model_name="digits-mlp",
            inputs=[tensor],
            outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="is_digit")],
            raw_input_contents=[both.tobytes()],
        )  # fmt: skip
        inferred = await v2_stub.ModelInfer(request)
        assert [(o.name, o.datatype, list(o.shape)) for o in inferred.outputs] == [
            ("is_digit", "BOOL", [2])
        ]
        assert list(inferred.raw_output_contents[0]) == [1, 0]
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
        body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 784],
                            "data": both.tolist()}]}  # fmt: skip
        outputs = (await (await http.post("/v2/models/digits-mlp/infer", json=body)).json())[
            "outputs"
        ]
        assert [o["name"] for o in outputs] == ["probabilities", SCORE_NAME, "is_digit"]
        assert outputs[2]["data"] == [True, False]


async def test_reading_a_number_is_one_request_and_leaves_out_what_is_not_a_digit(
    start_server, trained_model, mnist
):
    server = await start_server(trained_model, http_port=0)
    calls = metrics.request_series("Classify", "OK", "digits-mlp", "7")[0]
    before = calls._value.get()
    async with AsyncDigitClient(f"127.0.0.1:{server.port}") as client:
        reading = await client.read(number(mnist, [2, 0, 2, 6], 4))
        assert reading.text == "2026" and len(reading.digits) == 4 and not reading.dropped
        assert calls._value.get() - before == 1  # four digits, one Classify request
        mixed = await client.read(letter_among_digits(mnist))
    assert mixed.text == "37" and len(mixed.dropped) == 1, mixed.to_dict()
    assert mixed.dropped[0].prediction.is_digit is False
    picture = tmp_png(letter_among_digits(mnist))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
        form = aiohttp.FormData()
        form.add_field("file", picture, filename="mixed.png", content_type="image/png")
        read = await (await http.post("/v1/read", data=form)).json()
    assert read["text"] == "37" and len(read["digits"]) == 2 and len(read["dropped"]) == 1
    assert read["digits"][0]["box"][0] < read["digits"][1]["box"][0]
    assert read["dropped"][0]["is_digit"] is False and len(read["digits"][0]["pixels"]) == 784
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
        garbage = await http.post("/v1/read", data=b"not a picture")
        blank = await http.post("/v1/read", data=tmp_png(Image.new("L", (300, 200), 250)))
        assert garbage.status == 400 and "not an image" in (await garbage.json())["error"]
        assert blank.status == 200 and (await blank.json())["text"] == ""


async def test_every_reader_says_why_a_picture_holds_no_number(
    start_server, trained_model, tmp_path
):
    server = await start_server(trained_model, http_port=0)
    async with AsyncDigitClient(f"127.0.0.1:{server.port}") as client:
        reading = await client.read(scattered_dots())
    assert reading.text == "" and "scattered" in reading.reason
    assert reading.to_dict()["no_number"] == reading.reason
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http.port}") as http:
        read = await (await http.post("/v1/read", data=tmp_png(scattered_dots()))).json()
    assert read["text"] == "" and read["no_number"] == reading.reason
    assert len(read["dropped"]) == len(reading.dropped) and not read["digits"]
    dots = tmp_path / "dots.png"
    scattered_dots().save(dots)
    target = ["--target", f"127.0.0.1:{server.port}"]
    text = await asyncio.to_thread(CliRunner().invoke, client_main, ["read", str(dots), *target])
    assert text.output == f"{dots}: no digits found, {reading.reason}\n", text.output
    as_json = await asyncio.to_thread(
        CliRunner().invoke, client_main, ["read", "--json", str(dots), *target]
    )
    assert json.loads(as_json.output)["no_number"] == reading.reason


def tmp_png(picture: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_the_cli_reads_numbers_and_says_not_a_digit(
    start_server, trained_model, mnist, tmp_path
):
    server = await start_server(trained_model)
    target = f"127.0.0.1:{server.port}"
    number(mnist, [4, 2], 6).save(tmp_path / "forty-two.png")
    Image.new("L", (200, 200), 250).save(tmp_path / "blank.png")
    scribble = drawn.scribble(np.random.default_rng(3))
    scribble.save(tmp_path / "scribble.png")

    def cli(*args: str):
        return CliRunner().invoke(client_main, [*args, "--target", target])

    read = await asyncio.to_thread(
        cli, "read", str(tmp_path / "forty-two.png"), str(tmp_path / "blank.png")
    )
    assert read.exit_code == 0, read.output
    assert read.output.splitlines() == [
        f"{tmp_path / 'forty-two.png'}: 42",
        f"{tmp_path / 'blank.png'}: no digits found, the picture is blank or has too little "
        "contrast",
    ]
    as_json = await asyncio.to_thread(cli, "read", "--json", str(tmp_path / "forty-two.png"))
    record = json.loads(as_json.output)
    assert record["text"] == "42" and record["path"] == str(tmp_path / "forty-two.png")
    assert set(record["digits"][0]) >= {"box", "digit", "confidence", "is_digit", "digit_score"}
    classified = await asyncio.to_thread(cli, "classify", "--json", str(tmp_path / "scribble.png"))
    verdict = json.loads(classified.output)
    assert verdict["is_digit"] is False and 0 <= verdict["digit_score"] < 1
    text = await asyncio.to_thread(cli, "classify", str(tmp_path / "scribble.png"))
    assert text.output.startswith(f"{tmp_path / 'scribble.png'}: not a digit (score 0.")


def test_pictures_for_the_detector_go_through_the_clients_recipe(mnist):
    fonts, held = drawn.split_fonts(drawn.package_fonts())
    assert None in fonts and held and not set(fonts) & set(held)  # held-out fonts stay apart
    assert not drawn.LOOK_ALIKES & set(drawn.NON_DIGIT_GLYPHS)
    sets = drawn.detector_sets(mnist.x_train[:500], fonts, 0, 12, workers=1)
    assert {s.name for s in sets} == {kind for kind, _ in drawn.KINDS}
    for picture_set in sets:
        assert picture_set.pixels.shape[1] == 784
        assert picture_set.pixels.min() >= 0 and picture_set.pixels.max() <= 1


def test_the_detectors_picture_count_scales_with_the_training_images():
    assert drawn.default_count(60_000) == 1000  # the default run
    assert drawn.default_count(2_000) == 100  # --train-limit 2000: a quick run stays quick
    assert drawn.default_count(30_000) == 500


def test_drawn_pictures_are_cached_by_everything_they_depend_on(mnist, tmp_path):
    fonts, _ = drawn.split_fonts(drawn.package_fonts())
    digits = mnist.x_train[:300]
    first = drawn.detector_sets(digits, fonts, 0, 8, workers=1, cache_dir=tmp_path)
    (stored,) = tmp_path.glob("pictures-*.npz")
    again = drawn.Drawing(digits, fonts, 0, 8, workers=1, cache_dir=tmp_path)
    assert again.cached is not None and again.pool is None  # nothing drawn the second time
    for a, b in zip(first, again.collect(), strict=True):
        assert (a.name, a.is_digit, a.unreadable) == (b.name, b.is_digit, b.unreadable)
        np.testing.assert_array_equal(a.pixels, b.pixels)
    subset = drawn._subset(digits, 0)
    key = drawn.cache_key(subset, fonts, 0, 8)
    assert stored.name == f"pictures-{key}.npz"
    # Another seed, count, font set or digit set is another file, never the stored one.
    assert key != drawn.cache_key(subset, fonts, 1, 8)
    assert key != drawn.cache_key(subset, fonts, 0, 9)
    assert key != drawn.cache_key(subset, fonts[:-1], 0, 8)
    assert key != drawn.cache_key(drawn._subset(mnist.x_train[:301], 0), fonts, 0, 8)
    stored.write_bytes(b"damaged")  # a damaged file is drawn afresh, not trusted
    fresh = drawn.Drawing(digits, fonts, 0, 8, workers=1, cache_dir=tmp_path)
    fresh.close()
    assert fresh.cached is None


def _read_as(*verdicts: bool | None):
    from digit_recognizer.client.client import Prediction, Telemetry
    from digit_recognizer.client.reading import ReadDigit, Reading

    def piece(i: int, verdict: bool | None) -> ReadDigit:
        score = None if verdict is None else 0.5
        prediction = Prediction(
            i % 10, str(i % 10), 0.9, (0.1,) * 10, (), "1", Telemetry(1, 1, 0, 0), verdict, score
        )
        return ReadDigit((i * 10, 0, i * 10 + 8, 10), prediction)

    return Reading(tuple(piece(i, v) for i, v in enumerate(verdicts)))


def test_a_reading_is_no_number_when_most_pieces_are_not_digits():
    """Gravel cut into pieces, a few of which pass the detector, is no number."""
    gravel = _read_as(False, True, False, False, True, False, False)
    assert gravel.text == "" and not gravel.digits and len(gravel.dropped) == 7
    assert gravel.to_dict()["text"] == "" and len(gravel.to_dict()["dropped"]) == 7
    # A letter among digits is left out; the digits around it, leading zero too, stay.
    assert _read_as(True, True, False, True).text == "013"
    assert _read_as(None, None).text == "01"  # a model without a detector reads as before


def test_typed_digits_for_the_classifier_come_with_their_labels(mnist):
    fonts, _ = drawn.split_fonts(drawn.package_fonts())
    drawing = drawn.Drawing(mnist.x_train[:100], fonts, 0, 0, workers=1, typed=30)
    try:
        pixels, labels = drawing.typed_digits()
    finally:
        drawing.close()
    assert pixels.shape == (30, 784) and labels.shape == (30,)
    assert set(labels) <= set(range(10)) and len(set(labels)) > 3
    assert not drawing.jobs  # no detector pictures were asked for


def ruled(picture: Image.Image, gap: int = 180) -> Image.Image:
    """The picture on ruled paper: grey lines from edge to edge every `gap` pixels (the
    number written between two of them)."""
    pixels = np.asarray(picture).copy()
    pixels[gap // 8 :: gap] = np.minimum(pixels[gap // 8 :: gap], 120)
    return Image.fromarray(pixels)


def test_lines_across_the_picture_are_not_digits(mnist):
    """Rules of the paper, and a texture of nothing but lines: no pieces, and a reason."""
    written = ruled(number(mnist, [2, 0, 2, 6], 8))
    assert len(find_digits(written)) == 4
    blank = find_digits(ruled(Image.new("L", (300, 200), 250), gap=30))
    assert not blank and "lines run across" in blank.not_a_number


def test_bands_from_edge_to_edge_are_no_number(mnist):
    """Wood grain (full-height bands, each as wide as a digit) once read as "1111"; the same
    digits with paper above and below them still read."""
    from digit_recognizer.client.reading import EDGE_TO_EDGE

    y, x = np.mgrid[:180, :240]
    grain = 140 + 60 * np.sign(np.sin(x / 9 + 2 * np.sin(y / 30)))
    bands = find_digits(Image.fromarray(grain.astype(np.uint8)))
    assert bands.not_a_number == EDGE_TO_EDGE
    written = find_digits(number(mnist, [2, 0, 2, 6], 8))
    assert len(written) == 4 and written.not_a_number is None


def test_bands_from_one_edge_nearly_to_the_other_are_no_number():
    """A dense texture's blobs merge into pieces from the top edge to a few pixels short of
    the bottom one: grain read as "1113" in a new-user trial. Bands that tall touching one
    edge are the same pattern."""
    from digit_recognizer.client.reading import EDGE_TO_EDGE

    y, x = np.mgrid[:200, :240]
    grain = 140 + 60 * np.sign(np.sin(x / 9 + 2 * np.sin(y / 30)))
    grain[192:] = 250  # the bands end 8 px (4%) short of the bottom edge
    bands = find_digits(Image.fromarray(grain.astype(np.uint8)))
    assert bands.not_a_number == EDGE_TO_EDGE


def test_an_underline_or_a_box_around_a_number_is_not_part_of_it(mnist):
    """A form's field: the line under the digits, or the box around them, merged into the
    digits' pieces and the number read as none (new-user trial)."""
    underlined = number(mnist, [3, 5, 7, 1], 8)
    ImageDraw.Draw(underlined).line([(60, 200), (underlined.width - 60, 200)], fill=0, width=5)
    boxed = number(mnist, [8, 6, 4], 8)
    ImageDraw.Draw(boxed).rectangle([15, 20, boxed.width - 15, 205], outline=0, width=4)
    for picture, digits in ((underlined, 4), (boxed, 3)):
        cut = find_digits(picture)
        assert len(cut) == digits and cut.not_a_number is None, [p.box for p in cut]
        assert all(p.box[3] - p.box[1] < 170 for p in cut)  # no piece reaches the line
