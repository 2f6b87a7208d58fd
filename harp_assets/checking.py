"""What every asset check returns: passed or not, with the offending ids in the metadata (never a raise)."""

import dagster as dg


def check_result(problems: dict[str, list], **metadata) -> dg.AssetCheckResult:
    """Pass when no problem list is non-empty; each list's count and first ids go into the metadata."""
    md = {**metadata}
    for name, items in problems.items():
        md[name] = len(items)
        if items:
            md[f"{name}_examples"] = dg.MetadataValue.json([str(x) for x in items[:10]])
    return dg.AssetCheckResult(passed=not any(problems.values()), metadata=md)
