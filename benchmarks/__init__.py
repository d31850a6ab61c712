"""pouta.benchmarks."""
