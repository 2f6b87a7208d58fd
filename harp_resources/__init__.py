"""Dagster resources that own models, devices and external systems (embedder, finetuner, evaluator, ANN)."""
