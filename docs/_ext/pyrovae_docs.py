"""Two directives that keep the documentation in step with the code, and a guard for docstrings.

``{pyrovae-help} COMMAND`` renders ``pyrovae COMMAND --help`` (``pyrovae --help`` without an
argument) as the parser prints it, so the reference of the options cannot fall behind them.

``{pyrovae-other-modules}`` documents, with autodoc, every module of ``pyrovae``,
``pyrovae.models`` and ``pyrovae.guides`` that no page names in an ``.. automodule::`` directive (in an ``{eval-rst}`` block): a
new module appears in the API reference on the next build, before anyone files it under a page.

Docstrings: the engine's docstrings are written to be read as plain text in an editor — formulas
with ``|x|``, columns aligned with spaces — not always as reStructuredText. After napoleon has
turned the Google-style sections into fields, each blank-line-separated block of a docstring is
parsed on its own; a block that docutils would warn about is shown as it is written, as a literal
block, instead of failing the build or rendering mangled. ``|`` outside inline literals is escaped
first (docutils would read ``|log w|`` as a substitution). The blocks shown literally are listed
in the build's output (``-v``) and by ``literal_blocks()`` for the tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import docutils.core
import docutils.utils
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
# source folder → the package it is installed as (models/ and guides/ are mapped in pyproject.toml)
PACKAGES = {"pyrovae": "pyrovae", "pyrovae/cli": "pyrovae.cli", "models": "pyrovae.models", "guides": "pyrovae.guides"}
NOT_DOCUMENTED = {"pyrovae.__main__"}  # running it runs the command line
AUTOMODULE = re.compile(r"^\s*\.\. automodule::\s+([\w.]+)", re.MULTILINE)


def all_modules() -> list[str]:
    """Every module of the installed packages, from the files (nothing is imported)."""
    names = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            if name not in NOT_DOCUMENTED:
                names.append(name)
    return names


def documented_modules(skip: Path | None = None) -> set[str]:
    """The modules some page documents with ``.. automodule::``."""
    return {
        name
        for page in DOCS.rglob("*.md")
        if "_build" not in page.parts and page != skip
        for name in AUTOMODULE.findall(page.read_text(encoding="utf-8"))
    }


class PyrovaeHelp(SphinxDirective):
    """``pyrovae [COMMAND] --help`` as a literal block."""

    optional_arguments = 1

    def run(self):
        from pyrovae.cli.main import parser

        argv = [*self.arguments, "--help"]
        out = io.StringIO()
        columns = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the same width on every machine
        try:
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                parser().parse_args(argv)
        finally:
            if columns is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = columns
        text = out.getvalue().rstrip()
        if not text:
            raise self.error(f"pyrovae {' '.join(argv)} printed nothing")
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


class OtherModules(SphinxDirective):
    """autodoc for the modules that no page names."""

    def run(self):
        page = Path(self.env.doc2path(self.env.docname))
        missing = [m for m in all_modules() if m not in documented_modules(skip=page)]
        if not missing:
            text = "Every module is documented on one of the pages above."
            return [nodes.paragraph(text, text)]
        text = "```{eval-rst}\n" + "\n".join(f".. automodule:: {name}\n" for name in missing) + "```"
        container = nodes.section()
        self.state.nested_parse(StringList(text.splitlines(), source=str(page)), self.content_offset, container)
        return container.children


ROLE = re.compile(r":(?:[\w-]+:)*[\w-]+:`~?([^`]*)`")  # a Sphinx role: :func:`x`, :py:class:`~a.b`
LITERAL = re.compile(r"(``.+?``)")
LITERAL_SHOWN: list[tuple[str, str]] = []  # (object, block) shown literally, for the report


def escape_bars(line: str) -> str:
    """``|`` escaped outside inline literals, so that ``|log w|`` is text, not a substitution."""
    parts = LITERAL.split(line)
    return "".join(p if i % 2 else re.sub(r"(?<!\\)\|", r"\\|", p) for i, p in enumerate(parts))


def escape_bars_outside_literal_blocks(lines: list[str]) -> list[str]:
    """:func:`escape_bars` on every line except those of literal blocks (the more indented lines
    after a line ending in ``::``), which docutils shows as they are."""
    out: list[str] = []
    opener: int | None = None  # indent of the line ending in "::" whose literal block may follow
    literal: int | None = None  # indent of the line that opened the literal block we are in
    for line in lines:
        if not line.strip():
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip())
        if opener is not None:
            literal, opener = (opener if indent > opener else None), None
        elif literal is not None and indent <= literal:
            literal = None
        if literal is not None:
            out.append(line)
            continue
        out.append(escape_bars(line))
        if line.rstrip().endswith("::"):
            opener = indent
    return out


def parses_cleanly(block: list[str]) -> bool:
    """Whether docutils parses the block without a message (Sphinx roles stood in by literals)."""
    text = ROLE.sub(lambda m: f"``{m.group(1)}``", "\n".join(block))
    stream = io.StringIO()
    try:
        docutils.core.publish_doctree(
            text, settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": stream, "file_insertion_enabled": False}
        )
    except Exception:  # noqa: BLE001 -- a Sphinx directive (``.. math::``) needs Sphinx's environment: Sphinx judges it
        return True
    return not stream.getvalue()


def indent_of(block: list[str]) -> int:
    return min(len(line) - len(line.lstrip()) for line in block if line.strip())


def blocks(lines: list[str]) -> list[list[str]]:
    """The docstring cut into top-level constructs: blocks separated by blank lines, each with the
    more indented blocks that follow it (a directive's body, a literal block, a list item's text)."""
    paragraphs: list[list[str]] = []
    for line in lines:
        if not line.strip():
            if paragraphs and paragraphs[-1]:
                paragraphs.append([])
        elif not paragraphs:
            paragraphs.append([line])
        else:
            paragraphs[-1].append(line)
    out: list[list[str]] = []
    for paragraph in (p for p in paragraphs if p):
        if out and indent_of(paragraph) > indent_of(out[-1]):
            out[-1] += [""] + paragraph
        else:
            out.append(paragraph)
    return out


def guard_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """autodoc-process-docstring, after napoleon: blocks docutils cannot parse become literal blocks."""
    fixed: list[str] = []
    for block in blocks(escape_bars_outside_literal_blocks(lines)):
        if parses_cleanly(block):
            fixed += block + [""]
            continue
        LITERAL_SHOWN.append((name, "\n".join(block)))
        logger.verbose("%s: a block of its docstring is not reStructuredText; shown as written", name)
        indent = indent_of(block)
        fixed += ["::", ""] + ["    " + line[indent:].replace("\\|", "|") if line.strip() else "" for line in block] + [""]
    lines[:] = fixed


def literal_blocks() -> list[tuple[str, str]]:
    """The docstring blocks shown literally in this process's builds: (object, text)."""
    return list(LITERAL_SHOWN)


def defining_name(target: str, module: str | None) -> str | None:
    """Where the object a Python reference names is defined, as Python would find it: ``target``
    looked up in ``module``'s namespace (a name the module imports), or imported by its full
    dotted name (``pyrovae.models.VAE``, re-exported from ``pyrovae.models.vae``)."""
    import importlib
    import inspect

    target = target.lstrip("~.")
    for scope in ([module] if module else []) + [None]:
        parts = target.split(".")
        try:
            if scope is None:  # the longest importable prefix, then attributes
                for i in range(len(parts), 0, -1):
                    try:
                        obj = importlib.import_module(".".join(parts[:i]))
                        break
                    except ImportError:
                        continue
                else:
                    continue
                rest = parts[i:]
            else:
                obj, rest = importlib.import_module(scope), parts
            for part in rest:
                obj = getattr(obj, part)
        except (AttributeError, ImportError, ValueError):
            continue
        if inspect.ismodule(obj):
            name = obj.__name__
        elif hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
            name = f"{obj.__module__}.{obj.__qualname__}"
        else:
            continue
        if name != target:
            return name
    return None


def resolve_imported(app, env, node, contnode):
    """missing-reference: a pyrovae name referred to where it is imported or re-exported resolves
    to where it is defined and documented. Other packages' names are left to ``nitpick_ignore``."""
    if node.get("refdomain") != "py":
        return None
    name = defining_name(node["reftarget"], node.get("py:module"))
    if not name or not name.startswith("pyrovae"):
        return None
    domain = env.get_domain("py")
    resolved = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], name, node, contnode)
    if resolved is None and node["reftype"] in ("class", "func", "meth", "data", "attr", "exc"):
        resolved = domain.resolve_xref(env, node["refdoc"], app.builder, "obj", name, node, contnode)
    return resolved


def setup(app):
    app.add_directive("pyrovae-help", PyrovaeHelp)
    app.add_directive("pyrovae-other-modules", OtherModules)
    app.connect("autodoc-process-docstring", guard_docstring, priority=900)  # napoleon's runs at 500
    app.connect("missing-reference", resolve_imported)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
