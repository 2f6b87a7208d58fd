"""HARP as a Dagster project: the method core (`harp.method`), the demo benchmark
(`harp_assets.demo`) and the asset graph built on them."""
