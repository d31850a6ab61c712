"""pouta.trainer: train an anomaly detector on good parts, measure it, export it.

Rule: the commands and what they share sit at this top level (``train``, ``evaluate``,
``export``, ``demo``, the training config, checkpoints, losses, metrics, the input
geometry); ``data`` turns files into model inputs, ``synthesis`` makes up anomalies, and
``models`` holds every model kind behind one registry.
"""
