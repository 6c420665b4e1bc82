"""Every code block of the README and of the documentation pages runs, or says why it does not.

The blocks are read from the Markdown (```` ```python ```` and ```` ```bash ```` fences; ``text``
blocks are output and are not run). A block is not run when the line just above its fence is a
MyST comment ``% not run: REASON`` (in the README, which GitHub renders, an HTML comment
``<!-- not run: REASON -->``) — the reason is required, and shows in the page's source.

- Python blocks of a page run in order in one namespace, as a reader pastes them, in a fresh
  folder.
- Shell blocks of a page run line by line, in order, in a fresh folder that holds links to the
  checkout's ``examples/`` and ``benchmarks/``: each page trains the runs it reads. ``pyrovae ...``
  runs the command line in this process; ``python FILE ...`` runs a script with this Python. To
  keep the suite short, sizes are cut, always the same way (:func:`shrunk`): at most 2 epochs
  (4 with ``--resume``, so that a resumed run still has epochs to train), K ≤ 100 importance samples on ≤ 20 points, AIS with T ≤ 5, M ≤ 2, L ≤ 2. The commands are
  otherwise run as written, so an option that does not exist, a wrong path or a command that fails
  fails the test.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*/*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts and "generated" not in p.parts]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
NOT_RUN = re.compile(r"^(?:%\s*not run:\s*(.*)|<!--\s*not run:\s*(.*?)\s*-->)$")
SHELL = {"bash", "sh", "shell", "console"}


@dataclass
class Block:
    page: Path
    line: int
    language: str  # "python" or "shell"
    code: str
    not_run: str | None  # the reason, where the block is marked not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        language = "python" if m.group(1) == "python" else "shell" if m.group(1) in SHELL else None
        if language is None:
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marked = NOT_RUN.match(before)
        out.append(Block(page, text.count("\n", 0, m.start()) + 1, language, m.group(2), (marked.group(1) or marked.group(2) or "").strip() if marked else None))
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def commands(block: Block) -> list[list[str]]:
    """The block's commands, one per line, comments removed."""
    return [argv for line in block.code.splitlines() if (argv := shlex.split(line, comments=True))]


# ---------------------------------------------------------------- sizes cut for the tests

CAPS = {  # command → {option: (cap, value added when absent or None)}
    "train": {"--epochs": (2, 2)},
    "evaluate": {"-k": (100, 100), "--limit": (20, 20), "--particles-elbo": (10, 10),
                 "--ais-steps": (5, None), "--ais-chains": (2, None), "--ais-leapfrog": (2, None)},
    "compare": {"-k": (100, 100), "--limit": (20, 20), "--particles-elbo": (10, 10)},
    "latents": {"--limit": (50, 50)},
}
ALIASES = {"--samples": "-k"}
NO_PROGRESS = {"train", "evaluate", "compare"}


def shrunk(argv: list[str]) -> list[str]:
    """``pyrovae COMMAND ...`` with its sizes capped as the module docstring says."""
    command, args = argv[1], [ALIASES.get(a, a) for a in argv[2:]]
    caps = dict(CAPS.get(command, {}))
    if command == "train" and "--resume" in args:
        caps["--epochs"] = (2 * CAPS["train"]["--epochs"][0], None)  # above what the first run trained
    if command == "evaluate" and ("--ais" in args or "--bdmc" in args):
        caps.update({k: (c, c) for k, (c, _) in caps.items() if k.startswith("--ais-")})
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in caps and i + 1 < len(args):
            cap, _ = caps.pop(a)
            out += [a, str(min(int(args[i + 1]), cap))]
            i += 2
        elif a == "--iwae-k":
            values = []
            i += 1
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
            k = min(int(args[args.index("-k") + 1]), CAPS[command]["-k"][0]) if "-k" in args else CAPS[command]["-k"][0]
            out += ["--iwae-k", *sorted({str(min(int(v), k)) for v in values}, key=int)]
        else:
            out.append(a)
            i += 1
    for option, (_, default) in caps.items():
        if default is not None:
            out += [option, str(default)]
    if command in NO_PROGRESS and "--no-progress" not in out:
        out.append("--no-progress")
    return ["pyrovae", command, *out]


def runnable(argv: list[str]) -> bool:
    if argv[0] == "pyrovae":
        return len(argv) > 1
    return argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py")


# ---------------------------------------------------------------- what every page must keep


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_code_block_runs_or_says_why_not(page):
    for block in blocks(page):
        if block.not_run is not None:
            assert block.not_run, f"{block.where}: '% not run:' needs a reason"
        elif block.language == "shell":
            for argv in commands(block):
                assert runnable(argv), (f"{block.where}: the tests cannot run {shlex.join(argv)!r}; "
                                        "mark the block '% not run: REASON' or write it as a pyrovae or python command")


def test_the_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    setup = next(b for b in blocks(README) if b.language == "shell")
    assert setup.code.splitlines() == [
        ("python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pyrovae train --out runs/digits"
         " && .venv/bin/pyrovae evaluate runs/digits"),
        ".venv/bin/python -m pytest",
    ]
    for target in re.findall(r"\]\(((?:docs|examples)/[^)#]+)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    for target, anchor in re.findall(r"\]\((docs/[^)#]+\.md)#([^)]+)\)", text):
        headings = re.findall(r"^#+ (.+)$", (ROOT / target).read_text(encoding="utf-8"), re.MULTILINE)
        slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
        assert anchor in slugs, f"README links to {target}#{anchor}: no such heading"


def test_shrinking_caps_sizes_and_keeps_the_rest():
    assert shrunk(["pyrovae", "evaluate", "runs/x", "-k", "5000", "--iwae-k", "1", "5", "500", "--json", "e.json"]) == [
        "pyrovae", "evaluate", "runs/x", "-k", "100", "--iwae-k", "1", "5", "100", "--json", "e.json",
        "--limit", "20", "--particles-elbo", "10", "--no-progress"]
    assert shrunk(["pyrovae", "train", "--epochs", "1", "--out", "r"]) == ["pyrovae", "train", "--epochs", "1", "--out", "r", "--no-progress"]
    assert shrunk(["pyrovae", "evaluate", "r", "--ais", "--ais-steps", "1000"])[3:9] == ["--ais", "--ais-steps", "5", "-k", "100", "--limit"]
    assert shrunk(["pyrovae", "sample", "r"]) == ["pyrovae", "sample", "r"]
    assert shrunk(["pyrovae", "train", "--out", "r", "--resume", "--epochs", "20"])[-3:] == ["--epochs", "4", "--no-progress"]
    assert shrunk(["pyrovae", "train", "--out", "r", "--resume"]) == ["pyrovae", "train", "--out", "r", "--resume", "--no-progress"]


# ---------------------------------------------------------------- running them

PYTHON_PAGES = [p for p in PAGES if any(b.language == "python" and b.not_run is None for b in blocks(p))]
SHELL_PAGES = [p for p in PAGES if any(b.language == "shell" and b.not_run is None for b in blocks(p))]


@pytest.fixture
def registries():
    """Put the registries back as they were: a page may register a component of its own."""
    from pyrovae.guides import GUIDES
    from pyrovae.models import LIKELIHOODS, MODELS, PRIORS

    saved = [(r, copy.copy(r._entries)) for r in (PRIORS, LIKELIHOODS, GUIDES, MODELS)]
    yield
    for registry, entries in saved:
        registry._entries = entries


@pytest.mark.slow
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_blocks_run_in_order(page, tmp_path, monkeypatch, capsys, registries):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.language == "python" and block.not_run is None:
            exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 -- the page's own code, as a reader runs it
    assert capsys.readouterr().out or page == README  # the pages' blocks print what they show


@pytest.mark.slow
@pytest.mark.parametrize("page", SHELL_PAGES, ids=page_id)
def test_shell_blocks_run_in_order(page, tmp_path, monkeypatch, capsys, registries):
    from pyrovae.cli.main import main

    for folder in ("examples", "benchmarks"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for block in blocks(page):
        if block.language != "shell" or block.not_run is not None:
            continue
        for argv in commands(block):
            if argv[0] == "pyrovae":
                argv = shrunk(argv)
                assert main(argv[1:]) == 0, f"{block.where}: {shlex.join(argv)} failed:\n{capsys.readouterr().err[-3000:]}"
            else:
                done = subprocess.run([sys.executable, *argv[1:]], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, f"{block.where}: {shlex.join(argv)} failed:\n{done.stderr[-3000:]}"
