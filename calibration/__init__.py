"""pouta.calibration: threshold calibration, FP16/INT8 artifacts and TensorRT plans.

Runs without torch (build boxes, Jetsons). Modules: ``calibset`` (normal-image sets and
the ONNX Runtime calibration reader), ``quantize`` (the two INT8 ONNX files), ``fp16``,
``thresholds`` (the threshold rules), ``scoring``, ``plots``, ``guard`` (FP32 vs reduced
precision on a held-out split), ``tensorrt_build`` (``BuildPlan`` + executor),
``pipeline`` and ``cli`` (``pouta-calibrate``, ``pouta-build-engine``). Nothing is
imported here so that ``import pouta.calibration`` stays cheap.
"""
