"""What ``pouta-bench`` measures: one module per section or standalone measurement.

Rule: a module belongs here when it measures something and returns (or writes) its
results: cost, latency, accuracy beside cost, end to end, quality over real categories,
PRN's cue weights, tiling cost, runtime overhead, live-view load. What they share (the
models they build, their artifacts, timing, synthetic frames, the report) sits one level
up, beside the command (``cli``) that sequences them.
"""
