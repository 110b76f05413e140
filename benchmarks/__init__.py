"""Benchmarks: latency, throughput, memory and quality of the lite pipeline against the reference.

    python -m benchmarks                       # the embedded demo artifact and its reference
    python -m benchmarks --config blip2-opt-2.7b --batch-sizes 1 8
    python -m benchmarks --tiny                # a smoke run on a tiny random model (seconds)

Every backend (reference fp16 on CUDA, fp32 and bf16 on CPU; lite with each decoder its artifact
holds) is measured in a fresh child process (:mod:`benchmarks.measure`), so its peak memory is its
own and two large models never share one process. Random-weight models at real shapes are built
once, exported in memory-bounded stages and cached (:mod:`benchmarks.build`). The run writes
``results.json`` (every figure), ``results.md`` and ``results.png`` (:mod:`benchmarks.report`).

Modules: :mod:`.runner` (the run), :mod:`.models` (what is measured), :mod:`.build` (random
models and their artifacts), :mod:`.processes` (child processes and their peak memory),
:mod:`.measure` (one backend, in a child), :mod:`.decoder_speed` (decode steps alone and the
memory-bandwidth floor), :mod:`.compare` (ratios, targets, quality), :mod:`.machine` (the machine
and library versions), :mod:`.report` (outputs).
"""
