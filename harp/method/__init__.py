"""The HARP method core: plain numpy/faiss, no Dagster, so it can be tested and reused alone.

Stages, in pipeline order: `hierarchy` (large -> parent -> leaf; `growth` keeps leaf ids stable as the
pool grows), `posteriors` (bootstrap main effects and
empirical-Bayes posteriors), `envelopes` + `selection` (HARP-C / HARP-E greedy ranking, best-prefix cut,
point budget), and the baselines `tsds` and `random_selection`. `ann` holds the faiss index helpers.
"""

from harp.method.active import ActiveRound, choose_active_leaves
from harp.method.ann import AnnIndex, build_index, faiss_gpu_available, knn, to_euclidean
from harp.method.contamination import Match, embedding_matches, ngram_matches
from harp.method.envelopes import (
    ENVELOPES,
    GreedyResult,
    active_domains,
    envelope_objective,
    greedy_taskaware,
)
from harp.method.growth import (
    GrowthResult,
    LeafTable,
    LeafTableFormatError,
    grow_leaf_table,
    leaf_table_from_hierarchy,
    tree_generation,
)
from harp.method.hierarchy import (
    Hierarchy,
    assign_to_nearest_leaf,
    build_parent_leaf_hierarchy,
    member_order_for,
    normalized_embeddings,
    validate_embeddings,
)
from harp.method.posteriors import (
    Hyperparameters,
    MainEffects,
    Posteriors,
    bootstrap_main_effects,
    fit_posteriors,
)
from harp.method.selection import (
    HarpSelection,
    cap_to_budget,
    harp_select,
    predicted_utility,
    random_selection,
    without_rows,
)
from harp.method.tsds import TsdsResult, TsdsSelection, tsds_probabilities, tsds_run, tsds_select

__all__ = [
    "ActiveRound",
    "choose_active_leaves",
    "ENVELOPES",
    "AnnIndex",
    "GreedyResult",
    "GrowthResult",
    "HarpSelection",
    "Hierarchy",
    "Hyperparameters",
    "LeafTable",
    "LeafTableFormatError",
    "tree_generation",
    "MainEffects",
    "Posteriors",
    "TsdsResult",
    "TsdsSelection",
    "active_domains",
    "assign_to_nearest_leaf",
    "bootstrap_main_effects",
    "build_index",
    "build_parent_leaf_hierarchy",
    "cap_to_budget",
    "envelope_objective",
    "faiss_gpu_available",
    "fit_posteriors",
    "greedy_taskaware",
    "grow_leaf_table",
    "harp_select",
    "knn",
    "leaf_table_from_hierarchy",
    "member_order_for",
    "normalized_embeddings",
    "predicted_utility",
    "random_selection",
    "without_rows",
    "Match",
    "embedding_matches",
    "ngram_matches",
    "to_euclidean",
    "tsds_probabilities",
    "tsds_run",
    "tsds_select",
    "validate_embeddings",
]
