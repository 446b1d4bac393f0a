"""
Sphinx configuration for the txfractal documentation.
"""

import os
import sys

# The epytext extension lives beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

project = "txfractal"
author = "The txfractal developers"
extensions = ["sphinx.ext.autodoc", "epytext"]
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
