"""Every code block of README.md and docs/*.md runs as written (issue 28).

Fenced blocks tagged ``bash``, ``sh`` or ``python`` run, in page order, in one scratch folder per
page (the repository's files linked into it, ``.venv/bin/python`` mapped to this interpreter,
``PYTHONPATH`` the repository): a later block may read what an earlier one wrote. Blocks tagged
``text`` are printed output and never run. A block that cannot run in the suite says why on the
line right before it, with a reason from :data:`REASONS`, and may name the cheap command that
the test runs in its place:

    <!-- docs-test: long; runs as: .venv/bin/python sweeps/ablation_pad.py --help -->

The static checks (languages, markers, links, the README's length, CI's command, the timings
page) are the fast tier; running the pages is ``slow``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"bash", "sh", "python"}
SHOWN = {"text"}  # printed output, never run
#: why a block may not run as written in the suite
REASONS = {
    "gpu": "needs a CUDA GPU",
    "cluster": "needs a Ray cluster, cloud credentials or root on the machine",
    "long": "takes longer than the suite allows, or needs the output of such a run",
    "server": "starts a server that runs until it is stopped",
}
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<reason>[\w-]+)\s*(?:;\s*runs as:\s*(?P<instead>.+?))?\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
#: images a page shows before they are committed (the lead engineer adds them from a real run)
PENDING = {"docs/figures/pad_size.png"}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    reason: str | None = None
    instead: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse(page: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``page`` with their markers, and the problems found on the way."""
    lines = page.read_text().splitlines()
    blocks, problems, i = [], [], 0
    while i < len(lines):
        marker = MARKER.match(lines[i].strip())
        if "docs-test" in lines[i] and not marker:
            problems.append(f"{page.name}:{i + 1}: malformed docs-test marker: {lines[i]}")
        if marker and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            problems.append(f"{page.name}:{i + 1}: a docs-test marker must be right before a fence")
        fence = FENCE.match(lines[i])
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                problems.append(f"{page.name}:{i + 1}: unclosed fence")
                break
            previous = MARKER.match(lines[i - 1].strip()) if i else None
            blocks.append(Block(page, i + 1, fence["lang"], "\n".join(lines[i + 1:end]) + "\n",
                                previous["reason"] if previous else None,
                                previous["instead"] if previous else None))
            i = end
        i += 1
    return blocks, problems


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse(page)[0]]


def test_every_block_has_a_known_language_and_every_marker_a_known_reason():
    problems = [p for page in PAGES for p in parse(page)[1]]
    for block in all_blocks():
        if block.lang not in RUN | SHOWN:
            problems.append(f"{block.where}: fence ```{block.lang}: tag it bash, sh or python "
                            f"(it runs) or text (printed output)")
        if block.reason is not None and block.reason not in REASONS:
            problems.append(f"{block.where}: unknown docs-test reason '{block.reason}'; choose from "
                            f"{', '.join(REASONS)}")
        if block.reason is not None and block.lang not in RUN:
            problems.append(f"{block.where}: a text block needs no docs-test marker")
    assert not problems, "\n".join(problems)
    assert sum(b.lang in RUN and b.reason is None for b in all_blocks()) >= 5  # the parser finds them


def test_the_readme_stays_short_and_starts_with_its_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    blocks = parse(ROOT / "README.md")[0]
    assert blocks[0].code == "bash scripts/setup.sh && .venv/bin/python sweeps/ablation_pad.py\n"
    assert blocks[1].code == "bash scripts/setup.sh && .venv/bin/python -m pytest -q -n 2 --dist loadfile\n"


def test_ci_runs_exactly_the_readme_test_command():
    (command,) = [b.code.strip() for b in parse(ROOT / "README.md")[0] if "-m pytest" in b.code]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == command


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_links_between_pages_resolve():
    problems = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if str(file.relative_to(ROOT)) in PENDING:
                continue
            if not file.exists():
                problems.append(f"{page.name}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{page.name}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_timings_page_is_generated_from_its_data():
    spec = importlib.util.spec_from_file_location("timings", ROOT / "scripts" / "timings.py")
    timings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timings)
    stale = timings.stale()
    assert not stale, f"out of date (run python scripts/timings.py): {[str(p) for p in stale]}"


def workspace(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A folder that looks like the repository after ``scripts/setup.sh``: its files linked in
    (results/ stays in the folder), ``.venv/bin/<tool>`` running this interpreter's tools."""
    work = tmp / "repo"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".venv", "results", ".gpu"}:
            (work / entry.name).symlink_to(entry)
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    tools = Path(sys.executable).parent
    for name in ("python", "pytest", "mlflow", "ray"):
        target = sys.executable if name == "python" else tools / name
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg",
           "VPNS_CACHE": str(tmp / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    return work, env


RUNNABLE = [p for p in PAGES if any(b.lang in RUN for b in parse(p)[0])]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_the_page_runs_as_written(page, tmp_path):
    work, env = workspace(tmp_path)
    ran, skipped = [], []
    for n, block in enumerate(b for b in parse(page)[0] if b.lang in RUN):
        if block.reason is not None and block.instead is None:
            skipped.append(block)
            continue
        if block.reason is not None:
            command = ["bash", "-e", "-c", block.instead]
        elif block.lang == "python":
            script = work / f"docs_block_{n}.py"
            script.write_text(block.code)
            command = [sys.executable, str(script)]
        else:
            command = ["bash", "-e", "-c", block.code]
        out = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (f"{block.where} ({'in its place: ' + block.instead if block.reason else 'as written'})"
                                     f" exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        ran.append(block)
    unmarked = [b for b in parse(page)[0] if b.lang in RUN and b.reason is None]
    assert [b.line for b in unmarked] == [b.line for b in ran if b.reason is None]
    assert all(b.reason in REASONS for b in skipped)
