"""The throughput matrix (``darkspec bench``): every available backend, case, size and thread count, timed next to
baselines measured like for like in the same interleaved rounds (the memory copy, eager PyTorch, torch.compile,
Darknet's own functions), and only after each result was checked against the reference.

Modules: :mod:`~darkspec.bench.cases` (what is measured, the bytes each case must move), :mod:`~.timing` (timers,
rounds, medians), :mod:`~.contenders` (backends and baselines), :mod:`~.matrix` (check, then time),
:mod:`~.report` (tables, compare mode), :mod:`~.charts` (matplotlib), :mod:`~.cli`.
"""
