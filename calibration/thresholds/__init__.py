"""Thresholds: turning calibration scores into pass/fail limits, and measuring what they cost.

Rule: a module belongs here when it decides or reports a limit: the threshold rules
(``rules``, the one place that sets them), binomial bounds, the held-out parts and the
operating point measured on them, and the pictures and report a line engineer reads.
NumPy only; nothing here runs a model.
"""
