"""The offline demo benchmark: generated domains, a pool with known helpful, harmful and redundant regions,
and a small causal LM trained here, so that selection quality can be measured where the truth is known."""
