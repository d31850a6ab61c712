"""Engines: TensorRT plans built from the artifacts.

Rule: a module belongs here when it builds or inspects a TensorRT engine: the
pure-Python ``BuildPlan`` and its thin executor (``tensorrt``), and the engine
inspector's per-layer precisions (``inspector``). TensorRT is imported lazily.
"""
