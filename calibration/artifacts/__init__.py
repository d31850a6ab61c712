"""Artifacts: reduced-precision ONNX files built from the FP32 export.

Rule: a module belongs here when it writes or checks an INT8/FP16 ONNX file: ONNX
Runtime static quantization (``quantize``), what a Q/DQ graph really holds
(``qdq_check``), FP16 conversion (``fp16``) and the accuracy guard that compares an
artifact with FP32 (``guard``).
"""
