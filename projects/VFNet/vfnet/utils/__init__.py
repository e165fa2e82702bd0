"""The logic of the project's tools/ scripts: benchmarks and training-curve plots."""
