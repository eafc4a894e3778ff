"""The ``visinstruct`` command line."""
