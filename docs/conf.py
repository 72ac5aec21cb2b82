# SPDX-License-Identifier: Apache-2.0
# Sphinx configuration: `pip install -e ".[docs]" && sphinx-build docs docs/_build`.
project = "pyro-softmix"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
html_theme = "furo"
exclude_patterns = ["_build"]
nb_execution_mode = "off"
