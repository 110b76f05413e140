"""The tools around the runtime: training, the synthetic change world, datasets, evaluation and its
metrics, memory tables and random model generation.

They import the runtime (settings, composition, the artifact contract), never the other way round,
and most need an extra (``train``, ``eval``, ``reference``): a device that only describes pairs never
imports this package.
"""
