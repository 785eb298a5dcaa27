"""The code of ``benchmarks/quality.py``, split so that a reader finds each protocol.

The script keeps the command line (``parse_args``, ``main``); this package holds the rest:
``common`` (paths, dataset and method names, the run context, rows, formatting),
``settings`` (full and quick settings, what a run reduces), one module per protocol
(``magnetic_tile``, ``oneclass`` for Fashion-MNIST and MNIST, ``demo``), ``targets`` (the
issue's targets), ``render`` (the Markdown and the docs page block) and ``merge``
(``--merge``, ``--combine``, writing the results files). It is imported as ``_quality``:
benchmarks/ is sys.path[0] when the script runs and is on pytest's ``pythonpath``.
"""
