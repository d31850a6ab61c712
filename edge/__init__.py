"""pouta.edge: the line-side runtime, laid out as its pipeline.

source -> preprocess -> backend -> postprocess -> sinks. Each stage that has several
implementations is a subpackage behind one protocol:

- ``contract``: what trainer, calibration and the runtime share (the model contract).
- ``sources``: where frames come from (``sources.protocol``).
- ``backends``: what runs the model (``backends.protocol``).
- ``sinks``: where each part's record goes (``sinks.records``).
- ``liveview``: what ``--http`` serves (operator page, metrics, feedback).

This top level holds the pipeline itself and what wires and runs it: one module per
stage that has a single implementation (``postprocess``), the pipeline's own parts
(queue, stats, sequence, drift), its configuration, the CLI, the service and the doctor.
Subpackage ``__init__`` modules hold only their rule; nothing is re-exported.
"""
