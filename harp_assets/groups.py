"""Asset groups, one per stage of a HARP run; each job below runs one of them."""

PREPARE = "prepare"  # pool, eval set, embeddings, leaf hierarchy, base scores
MEASURE = "measure"  # leaf utilities (one partition per leaf)
SELECT = "select"  # posteriors, selections, active-round plan, catalog
VALIDATION = "validation"  # exhaustive oracle and held-out validation
