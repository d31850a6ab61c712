"""Made-up anomalies: what a model that learns from defects sees when a line has none.

Rule: a module belongs here when it only draws pixels and masks: the DRAEM-style Perlin and
texture synthesis (``anomalies``), the texture sources, the defect modes (scratches, dents,
...) and the geometric augmentations. Nothing here reads a dataset or knows a model; only the contract's image reading and
errors are shared.
"""
