"""pouta.benchmarks: POUTA vs the vanilla baseline, cost, latency, accuracy, end to end.

    pouta-bench --out runs/bench          # full run (paper preset, 224x224, every backend here)
    pouta-bench --quick                   # CI smoke run (tiny preset, 64x64, seconds)
    python -m pouta.benchmarks --help

Programmatic use: ``pouta.benchmarks.cli.run(Options(...)) -> dict`` (also written to
``<out>/results.json``); ``pouta.benchmarks.report.markdown(results)`` rebuilds the report.

Layout rule: each measurement is a module of ``sections``; what several of them share (the
models they build, artifacts, timing, synthetic frames, the report and its charts) sits
here beside ``cli``, which declares the options and sequences the sections.
"""
