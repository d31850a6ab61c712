"""POUTA, its ablations and the vanilla DRAEM-style baseline."""
