"""The models as plain classes: device choice, embedder, LoRA finetuner, evaluator, vLLM backend, ANN search.

Each is a pydantic model whose fields are its configuration, so the same class serves `harp()`, the
benchmarks and (through `harp_resources`) Dagster's launchpad.
"""
