"""Errors the CLI prints as one line with exit status 2 (never a traceback).

In a module of its own so that every command raises the class ``main`` catches, also when ``main`` runs as
``python -m visinstruct.cli.main`` (where that module is ``__main__``, a second copy with classes of its own).
"""


class UserError(Exception):
    """An error caused by the input or the command line; printed as one line, exit status 2."""
