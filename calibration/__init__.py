"""pouta.calibration: threshold calibration, FP16/INT8 artifacts and TensorRT plans.

Runs without torch (build boxes, Jetsons). This top level holds the two commands
(``cli``: ``pouta-calibrate``, ``pouta-build-engine``), the steps they share (``steps``),
the normal-image sets (``calibset``), scoring through the runtime's backend
(``scoring``) and the errors. Each kind of output is a subpackage:

- ``thresholds``: scores -> pass/fail limits and what they cost (rules, binomial bounds,
  held-out operating points, their plots and report).
- ``artifacts``: reduced-precision ONNX files (INT8 Q/DQ, FP16) and the accuracy guard.
- ``engines``: TensorRT plans (``BuildPlan`` + executor, the engine inspector's layers).

Package ``__init__`` modules hold only their rule and import nothing, so that
``import pouta.calibration`` stays cheap.
"""
