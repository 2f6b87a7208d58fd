"""Pictures in asset metadata: the greedy gain curve, the predicted utility with its band, the composition by
region and domain, the posterior sd of measured and inferred leaves."""

from __future__ import annotations

import base64

import pytest
from helpers import metadata

PNG = b"\x89PNG\r\n\x1a\n"


def _png(markdown: str, alt: str) -> bytes:
    prefix = f"![{alt}](data:image/png;base64,"
    assert markdown.startswith(prefix) and markdown.endswith(")")
    return base64.b64decode(markdown[len(prefix):-1])


@pytest.mark.slow
def test_selections_and_posteriors_carry_their_plots(tiny_pipeline):
    select = tiny_pipeline.results["select"]
    for method in ("harp_c", "harp_e"):
        md = metadata(select, f"{method}_selection")
        assert _png(md["gain_curve"], "greedy gain curve").startswith(PNG)
        assert _png(md["predicted_utility"], "predicted utility per domain with its band").startswith(PNG)
        assert isinstance(md["saturated_domains"], list)
    for method in ("harp_c", "harp_e", "tsds", "random"):
        md = metadata(select, f"{method}_selection")
        assert _png(md["composition"], "selection composition by region and domain").startswith(PNG)
    post = metadata(select, "phi_posteriors")
    assert _png(post["posterior_sd_measured_vs_inferred"], "posterior sd, measured and inferred").startswith(PNG)
    assert _png(post["phi_heatmap"], "phi heatmap").startswith(PNG)
