"""The HARP code location: the asset graph, its jobs, sensors, schedule and checks (`definitions.py`).

The method, the models and the stage sequence live in the `harp` library; this package only wires them
into Dagster.
"""
