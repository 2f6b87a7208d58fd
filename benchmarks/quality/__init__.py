"""The HARP selection-quality benchmark: how close HARP's selections come to the exhaustive oracle's."""
