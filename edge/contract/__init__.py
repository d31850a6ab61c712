"""The model contract: what trainer, calibration and the runtime share.

Rule: a module belongs here when code outside ``pouta.edge`` (trainer, calibration,
benchmarks) needs it to produce or read what the runtime consumes: preprocessing and
geometry, the metadata sidecar, the settings layer, the shared errors, atomic files and
the overlay picture. These modules import only each other (and, for the verdict names,
``postprocess``), never a source, backend or sink, and never torch.
"""
