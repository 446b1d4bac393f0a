"""
Sphinx configuration for the txfractal documentation.
"""

project = "txfractal"
author = "The txfractal developers"
extensions = ["sphinx.ext.autodoc"]
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
