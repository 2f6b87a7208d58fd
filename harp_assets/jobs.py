"""The four jobs, split where leaf partitions are created and where the costly validation starts.

`harp_prepare_job` registers the leaf partitions, `leaf_utilities_job` measures a range of them in one step
(the base model loads once per run), `harp_select_job` fits and selects; `harp_validation_job` is off the
default path. Prepare, select and validation run their steps in the run's own process (`in_process_executor`):
launched from the UI, a step subprocess each would import torch and reload the code location, which made a
9 s selection take almost 2 minutes. `leaf_utilities_job` keeps Dagster's default executor: its one step per
run trains in a process of its own, and the `gpu` pool limits those steps either way.
"""

import dagster as dg

from harp_assets.active_round import active_round_plan
from harp_assets.base_scores import base_model_scores
from harp_assets.catalog import lineage_catalog
from harp_assets.contamination import pool_contamination
from harp_assets.embeddings import example_embeddings
from harp_assets.exports import selection_exports
from harp_assets.hierarchy import leaf_hierarchy
from harp_assets.leaf_utilities import leaf_utilities
from harp_assets.posteriors import phi_posteriors
from harp_assets.selections import SELECTION_ASSETS
from harp_assets.sources import pool_examples, proxy_eval_set
from harp_assets.validation import exhaustive_selection, selection_validation

PREPARE_ASSETS = [pool_examples, proxy_eval_set, example_embeddings, pool_contamination, leaf_hierarchy,
                  base_model_scores]
SELECT_ASSETS = [phi_posteriors, *SELECTION_ASSETS.values(), active_round_plan, lineage_catalog, selection_exports]
VALIDATION_ASSETS = [exhaustive_selection, selection_validation]
ALL_ASSETS = [*PREPARE_ASSETS, leaf_utilities, *SELECT_ASSETS]

harp_prepare_job = dg.define_asset_job(
    "harp_prepare_job", executor_def=dg.in_process_executor, selection=PREPARE_ASSETS,
    description="Pool, eval set, embeddings, leaf hierarchy (registers leaf partitions) and base scores.",
)
leaf_utilities_job = dg.define_asset_job(
    "leaf_utilities_job", selection=[leaf_utilities],
    description="Measure leaf partitions; a partition range runs in one step with the base model loaded once.",
)
harp_select_job = dg.define_asset_job(
    "harp_select_job", executor_def=dg.in_process_executor, selection=SELECT_ASSETS,
    description="Posteriors from HARP's measured leaves, the four selections, the next active round's plan, the "
    "run manifest and the DuckDB catalog.",
)
harp_validation_job = dg.define_asset_job(
    "harp_validation_job", executor_def=dg.in_process_executor, selection=VALIDATION_ASSETS,
    description="The exhaustive oracle (every leaf must be measured) and every selection validated on the "
    "held-out test split; `make validate` measures the leaves and runs it.",
)

JOBS = [harp_prepare_job, leaf_utilities_job, harp_select_job, harp_validation_job]
