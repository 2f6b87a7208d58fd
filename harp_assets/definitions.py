"""The HARP code location: one module per asset family, assembled here with the demo as the default data.

Importing this module builds nothing and loads no model: paths resolve when an asset runs.
"""

import dagster as dg

from harp_assets.automation import CHAIN_SENSORS, daily_reselection, pool_growth_sensor
from harp_assets.hierarchy import every_example_in_one_leaf
from harp_assets.jobs import ALL_ASSETS, JOBS, VALIDATION_ASSETS
from harp_assets.posteriors import POSTERIOR_CHECKS
from harp_assets.selections import SELECTION_CHECKS
from harp_resources import default_resources

defs = dg.Definitions(
    assets=[*ALL_ASSETS, *VALIDATION_ASSETS],
    asset_checks=[every_example_in_one_leaf, *POSTERIOR_CHECKS, *SELECTION_CHECKS],
    jobs=JOBS,
    sensors=[pool_growth_sensor, *CHAIN_SENSORS],
    schedules=[daily_reselection],
    resources=default_resources(),
)
