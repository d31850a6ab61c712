"""Backends: what runs the model on a batch (the pipeline's backend stage).

Rule: one module per inference engine behind ``protocol.Backend``, plus what only those
engines need (CUDA memory for TensorRT). ``protocol.open_backend`` picks the engine from
the model file; engines import their optional dependency lazily.
"""
