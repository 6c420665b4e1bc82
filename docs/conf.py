"""Sphinx configuration of pyrovae's documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (the ``docs`` extra).
Pages are MyST Markdown; the API reference is generated from the docstrings (autodoc + napoleon);
the tutorial notebook is rendered as stored, without executing it (myst-nb).
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "pyrovae"
author = "the pyrovae authors"
copyright = "the pyrovae authors"

extensions = [
    "myst_nb",  # MyST Markdown pages and the tutorial notebook (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "pyrovae_docs",  # docs/_ext: the command line's --help, and the modules no API page names
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
# generated/ holds table fragments that pages include; they are not pages of their own.
exclude_patterns = ["_build", "generated", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the tutorial is rendered as stored; the tests run it

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = "pyrovae"
html_theme_options = {"description": "Variational autoencoders as Pyro programs", "fixed_sidebar": True}

# Cross-references: every reference to a pyrovae object must resolve (-W makes a broken one an
# error); names imported or re-exported inside pyrovae resolve to where they are defined
# (docs/_ext/pyrovae_docs.py). Other packages' names (torch, pyro, the standard library) are not
# linked: there is no network at build time for intersphinx.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!pyrovae\b).*"),  # torch.Tensor, pyro.*, pathlib.Path, ...
    (r"py:.*", r"pyrovae\.registry\.T"),  # the registry's TypeVar
]
