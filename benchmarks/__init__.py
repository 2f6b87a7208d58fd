"""Benchmarks: speed of the method core and the models (scripts here) and selection quality (`quality/`)."""
