# SPDX-License-Identifier: Apache-2.0
# Sphinx configuration. Build from the repository root, so that the README, the docs and the
# tutorials link to each other by the same relative paths as on GitHub:
#     pip install -e ".[docs]" && sphinx-build -W -c docs . docs/_build
# then open docs/_build/docs/index.html. The tutorials run during the build, in smoke mode
# unless PYRO_SOFTMIX_SMOKE is set to "" (the full mode takes a few minutes).
import os

os.environ.setdefault("PYRO_SOFTMIX_SMOKE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

project = "pyro-softmix"
author = "The pyro-softmix authors"
# MathJax is served from the built site itself (sphinx-mathjax-offline), not from a CDN, so the
# pages render math without a network.
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
              "sphinx-mathjax-offline"]
html_theme = "furo"
html_title = "pyro-softmix"
root_doc = "docs/index"
include_patterns = ["README.md", "docs/*.md", "tutorials/*.md"]
exclude_patterns = ["docs/_build", "**/.ipynb_checkpoints"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "force"
nb_execution_in_temp = True  # the tutorials' files do not land in the source tree
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_merge_streams = True
napoleon_google_docstring = True
autodoc_member_order = "bysource"
