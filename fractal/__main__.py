"""
C{python -m fractal}: the same as the C{fractal} command.
"""

import sys

from fractal._cli import main

sys.exit(main())
