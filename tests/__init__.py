"""
The tests of txfractal, run with C{python -m twisted.trial tests}.
"""
