"""
Example txfractal applications.  Run one with
C{twistd -n fractal --app examples.mailbox:application}.
"""

__all__: list[str] = []
