"""End to end in a real browser: Playwright drives Debian's headless Chromium on the page,
draws digits with mouse strokes, uploads photos, typed numbers and letters. Opt-in: `make
browser-test` installs Chromium and Playwright (the `browser` extra) and runs it; skipped
where either is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="needs the [browser] extra")

FLAGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

# Strokes in pad coordinates (the pad is 280x280, drawn on at its displayed size).
SEVEN = [[(70, 60), (210, 60), (120, 230)]]
ONE = [[(140, 40), (140, 240)]]


@pytest.fixture(scope="module")
def page_url(trained_model, tmp_path_factory):
    from processes import ServerProcess

    server = ServerProcess("--model", str(trained_model), "--http-port", "0")
    server.wait_serving()
    port = server.http_port()
    yield f"http://127.0.0.1:{port}/"
    server.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield instance
        instance.close()


def typed(text: str, path: Path, stroke: int = 0) -> Path:
    """`text` in black on white in Pillow's own font (the same on every machine), as a PNG."""
    font = ImageFont.load_default(size=120)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    paper = Image.new("L", (right - left + 80, bottom - top + 80), 255)
    ImageDraw.Draw(paper).text(
        (40 - left, 40 - top), text, fill=0, font=font, stroke_width=stroke, stroke_fill=0
    )
    paper.save(path)
    return path


# Every box in the answer's section that can be seen: whether it has ink and what its caption says.
BOXES = """() => Array.from(document.querySelectorAll('main section:last-child canvas'))
  .filter((c) => c.checkVisibility())
  .map((c) => {
    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const caption = c.closest('figure')?.querySelector('figcaption');
    return {
      inked: data.some((v, i) => i % 4 !== 3 && v > 0),
      caption: caption && caption.checkVisibility() ? caption.textContent.trim() : '',
    };
  })"""
# Whether the drawing pad is all white (nothing on it) or has something darker on it.
PAD_BLANK = """() => Array.from(document.getElementById('pad').getContext('2d')
  .getImageData(0, 0, 280, 280).data).every((v) => v === 255)"""


def draw(page, strokes) -> None:
    box = page.locator("#pad").bounding_box()
    scale = box["width"] / 280
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * scale, box["y"] + y * scale)
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=12)
        page.mouse.up()


@pytest.mark.parametrize(("strokes", "digit"), [(SEVEN, "7"), (ONE, "1")])
def test_drawing_a_digit_shows_it(browser, page_url, strokes, digit, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(page_url)
    draw(page, strokes)
    answer = page.get_by_test_id("answer")
    playwright.expect(answer).to_have_text(digit, timeout=10_000)
    assert page.locator(".bar").count() == 10
    page.screenshot(path=str(tmp_path / f"drawn-{digit}.png"))
    page.close()


def test_uploading_a_photo(browser, page_url):
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    page.goto(page_url)
    page.locator("#file").set_input_files(str(EXAMPLES / "photo-4-label4-jpeg.jpg"))
    playwright.expect(page.get_by_test_id("answer")).to_have_text("4", timeout=10_000)
    page.close()


def test_clear_leaves_nothing_and_a_failed_upload_shows_only_its_error(browser, page_url, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(page_url)
    draw(page, SEVEN)
    answer = page.get_by_test_id("answer")
    playwright.expect(answer).to_have_text("7", timeout=10_000)
    inked = (
        "() => Array.from(document.getElementById('seen').getContext('2d')"
        ".getImageData(0, 0, 28, 28).data).some((v, i) => i % 4 === 3 ? false : v > 0)"
    )
    assert page.evaluate(inked)  # the 28x28 the model saw
    page.get_by_role("button", name="Clear").click()
    page.wait_for_timeout(500)  # a reply still on its way must not repaint
    playwright.expect(answer).to_have_text("?")
    assert page.locator(".bar").count() == 0 and not page.evaluate(inked)
    draw(page, SEVEN)
    playwright.expect(answer).to_have_text("7", timeout=10_000)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    page.locator("#file").set_input_files(str(broken))
    playwright.expect(page.locator("#status")).to_contain_text("not an image", timeout=10_000)
    playwright.expect(answer).to_have_text("?")
    assert page.locator(".bar").count() == 0
    assert page.request.get(page_url + "favicon.ico").status == 200
    page.close()


def test_a_number_shows_only_boxes_with_something_in_them_and_a_caption(
    browser, page_url, tmp_path
):
    """Issue 21: after "2026" a blank black 28x28 with no caption stayed beside the number."""
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(page_url)
    page.locator("#file").set_input_files(str(typed("2026", tmp_path / "2026.png")))
    confidence = page.locator("#confidence")
    playwright.expect(confidence).to_contain_text("a number of 4 digits", timeout=10_000)
    assert len(page.get_by_test_id("answer").inner_text()) == 4
    boxes = page.evaluate(BOXES)
    assert boxes and all(box["inked"] and box["caption"] for box in boxes), boxes
    page.close()


def test_not_a_digit_shows_no_bar_as_the_answer(browser, page_url, tmp_path):
    """Issue 21: a typed A said "doesn't look like a digit" beside a green 97% bar for 2."""
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(page_url)
    page.locator("#file").set_input_files(str(typed("A", tmp_path / "a.png", stroke=3)))
    confidence = page.locator("#confidence")
    playwright.expect(confidence).to_contain_text("doesn't look like a digit", timeout=10_000)
    playwright.expect(page.get_by_test_id("answer")).to_have_text("?")
    assert page.locator(".bar.best").count() == 0  # no bar picked out as the answer
    playwright.expect(page.locator("#bars")).to_contain_text("not a digit")
    colours = page.evaluate(
        "() => Array.from(document.querySelectorAll('.bar .fill'), "
        "(f) => getComputedStyle(f).backgroundColor)"
    )
    assert len(colours) == 10 and len(set(colours)) == 1, colours  # all alike: grey
    assert colours[0] not in ("rgb(22, 163, 74)", "rgb(37, 99, 235)")  # not the answer's colours
    page.close()


def test_a_refused_upload_leaves_no_earlier_picture(browser, page_url, tmp_path):
    """Issue 21: after a corrupt upload the previous picture stayed on the pad under the error."""
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(page_url)
    page.locator("#file").set_input_files(str(EXAMPLES / "photo-4-label4-jpeg.jpg"))
    answer = page.get_by_test_id("answer")
    playwright.expect(answer).to_have_text("4", timeout=10_000)
    assert not page.evaluate(PAD_BLANK)  # the photo is on the pad
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    page.locator("#file").set_input_files(str(broken))
    playwright.expect(page.locator("#status")).to_contain_text("not an image", timeout=10_000)
    assert page.evaluate(PAD_BLANK)
    playwright.expect(answer).to_have_text("?")
    assert page.locator(".bar").count() == 0 and page.evaluate(BOXES) == []
    page.close()
