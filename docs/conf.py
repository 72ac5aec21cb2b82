# SPDX-License-Identifier: Apache-2.0
# Sphinx configuration: `pip install -e ".[docs]" && sphinx-build -W docs docs/_build`.
project = "pyro-softmix"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
html_theme = "furo"
exclude_patterns = ["_build"]
nb_execution_mode = "off"  # the tutorials are executed by the test suite
napoleon_google_docstring = True
autodoc_member_order = "bysource"
suppress_warnings = ["myst.xref_missing"]
