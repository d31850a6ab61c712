"""What training reads: the data a model learns from and is measured on.

Rule: a module belongs here when it turns files on disk into model inputs: the MVTec-layout
readers (``readers``), the training set that crops, synthesises and sizes samples for a
model config (``training_set``), and the generated demo category (``demo_data``). Made-up
anomalies come from ``pouta.trainer.synthesis``; geometry and the model contract from
``pouta.trainer.geometry`` and ``pouta.edge.contract``.
"""
