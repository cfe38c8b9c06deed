"""The command lines: argument parsing, printing and exit codes over the library (``gpt.recipes``,
``gpt.generate``, ``gpt.prepare``, ``gpt.export``), which never parses argv or exits.

``train.py`` -> ``gpt.cli.train``; ``python -m gpt.generate`` -> ``gpt.cli.generate``; ``python -m gpt.data
prepare`` -> ``gpt.cli.prepare``; ``python -m gpt.export`` -> ``gpt.cli.export``. Imports go one way: a CLI
module imports the library, nothing in the library imports a CLI module (the ``__main__`` shims of
``gpt/generate.py``, ``gpt/data.py`` and ``gpt/export.py`` run only as scripts).
"""
