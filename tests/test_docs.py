"""The documentation: the mkdocs site builds strictly (a broken link or anchor, or a page left
out of nav, fails), and the README stays a short front page whose links all lead somewhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 250

# [text](target) and ![alt](target); targets hold no spaces or parentheses here.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# Code is not prose: fenced blocks, and indented blocks (lines of four spaces or more).
FENCE_OR_INDENTED = re.compile(r"^```.*?^```|^(?: {4}[^\n]*\n?)+", re.MULTILINE | re.DOTALL)


def mkdocs_build(
    site_dir: Path, config: Path = REPO / "mkdocs.yml"
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config)]
    return subprocess.run(
        [*command, "--site-dir", str(site_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading; GitHub's agrees for ours."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: Path) -> set[str]:
    prose = FENCE_OR_INDENTED.sub("", markdown.read_text())
    return {slug(h) for h in HEADING.findall(prose)}


def broken_links(markdown: Path) -> list[str]:
    """Relative links (and #anchors into .md files) in `markdown` that lead nowhere."""
    broken = []
    prose = FENCE_OR_INDENTED.sub("", markdown.read_text())
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        file = (markdown.parent / path).resolve() if path else markdown
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no heading #{fragment} in {file.name}")
    return broken


def test_the_site_builds_strictly(tmp_path):
    result = mkdocs_build(tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").exists()


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict settings are what catch it: a copy of the docs with one bad link fails."""
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    config = tmp_path / "mkdocs.yml"  # its docs_dir is relative: the copy
    shutil.copy(REPO / "mkdocs.yml", config)
    assert mkdocs_build(tmp_path / "good", config).returncode == 0
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\n[gone](no-such-page.md)\n")
    result = mkdocs_build(tmp_path / "bad", config)
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def test_the_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/"
    )


def test_every_relative_link_in_the_readme_leads_somewhere():
    assert LINK.findall(README.read_text()), "the README links into docs/"
    assert broken_links(README) == []


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# There\n\n## A section\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-section) [web](https://example.com/x.md)\n"
        "\n    [in a code block](ignored.md)\n\n"
        "[gone](missing.md) [bad anchor](there.md#nowhere) ![img](missing.png)\n"
        "```\n[fenced](ignored.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "there.md#nowhere: no heading #nowhere in there.md",
        "missing.png: no such file",
    ]


def test_every_docs_page_is_in_the_nav():
    """mkdocs warns about pages outside nav (strict makes it fatal); this says which."""
    nav = (REPO / "mkdocs.yml").read_text()
    missing = [p.name for p in (REPO / "docs").glob("*.md") if f": {p.name}" not in nav]
    assert missing == []


def test_make_run_takes_the_ports_the_readme_shows():
    """`make run PORT=.. HTTP_PORT=.. METRICS_PORT=..` (README) reaches digit-server's flags;
    without METRICS_PORT no --metrics-port is passed, so $DIGITS_METRICS_PORT still counts
    (a second server on one machine met the metrics port taken, with no way shown)."""
    assert "make run PORT=6000 HTTP_PORT=8081 METRICS_PORT=8003" in README.read_text()

    # Under `make test` the outer make's flags would reach this one (-w adds "Leaving
    # directory" lines): a clean environment, and the server's line picked out.
    outer = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    env = {name: value for name, value in os.environ.items() if name not in outer}

    def dry_run(*variables: str) -> str:
        done = subprocess.run(
            ["make", "-n", "run", *variables],
            cwd=REPO, capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        return next(line for line in done.stdout.splitlines() if "digit-server" in line)

    line = dry_run("PORT=6000", "HTTP_PORT=8081", "METRICS_PORT=8003")
    assert "--port 6000" in line and "--http-port 8081" in line and "--metrics-port 8003" in line
    assert "--metrics-port" not in dry_run()
