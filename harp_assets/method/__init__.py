"""The HARP method core: plain numpy/faiss, no Dagster, so it can be tested and reused alone."""
