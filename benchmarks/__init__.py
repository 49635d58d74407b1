"""kstep benchmarks: ``python -m benchmarks --help``.

Not part of the installed package: a CLI that trains small models with kstep's K controller and
with optax baselines on the same init, data order, steps and seeds, writes one JSON per run under
``benchmarks/runs/<task>/`` (git-ignored) and, with ``report``, the committed summaries and plots
under ``benchmarks/results/<task>/``.
"""
