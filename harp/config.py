"""The settings every HARP stage shares (hierarchy sizes, budget, seeds, baselines) and where the demo lives.

Plain pydantic models: `harp()` and the benchmarks build them directly, and `harp_resources` exposes the
same fields to Dagster's launchpad.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationInfo, field_validator


def dagster_home() -> Path:
    """The instance folder; assets persist under it, so it must be an absolute, existing path."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise RuntimeError("DAGSTER_HOME is not set: point it at an absolute folder (the Makefile uses dagster_home/)")
    path = Path(home)
    if not path.is_absolute():
        raise RuntimeError(f"DAGSTER_HOME must be an absolute path, got {home!r}")
    return path


# The method options (docs/method.md, "Method options"): each name's first value is the reference behaviour.
POSTERIOR_PRIORS: tuple[str, ...] = ("tree", "kernel")
REPRESENTATIVE_RULES: tuple[str, ...] = ("central", "central_farthest")
ENVELOPE_RISKS: tuple[str, ...] = ("plugin", "expected", "lcb")
ACTIVE_RULES: tuple[str, ...] = ("verify_upside", "thompson", "knowledge_gradient")


class HarpSettings(BaseModel):
    """HARP selection settings: hierarchy sizes, budget, seeds and baseline parameters."""

    seed: int = Field(default=0, description="one seed for clustering, LoRA, bootstrap and sampling")
    leaf_size: int = Field(default=100, description="target examples per leaf")
    leaves_per_parent: int = Field(
        default=12, description="target leaves per parent; with 2 representatives ~1/6 of leaves are trained")
    parents_per_region: int = 8
    n_representatives: int = Field(default=2, description="leaves measured per parent")
    max_leaf_size: int = Field(default=400, description="a leaf grown past this splits when the pool grows")
    top_k_points: int = Field(default=2000, description="point budget shared by every selection")
    n_boot: int = Field(default=200, description="bootstrap resamples of the proxy set per domain")
    z_active: float = Field(default=1.0, description="a domain is active when some leaf is this many sds from 0")
    active_runs: int = Field(default=0, ge=0, description="extra leaf runs per active round (0: none)")
    active_rounds: int = Field(default=1, ge=0, description="active measuring rounds after the representatives")
    active_z: float = Field(default=1.0, ge=0, description="optimism of an unmeasured leaf's possible gain")
    primary_envelope: str = Field(
        default="expansive",
        description="envelope the active round verifies and the exhaustive oracle selects with")
    posterior_prior: str = Field(
        default="tree", description="tree: the region/parent/leaf model; kernel: a cross-domain kernel prior over "
        "leaf centroids, the tree model on its residual")
    min_measured_regions: int = Field(
        default=2, ge=2, description="measured regions needed before the region variance is fitted (else 0)")
    representative_rule: str = Field(
        default="central", description="central: the leaves closest to the parent centroid; central_farthest: "
        "half the most central, half the farthest")
    envelope_risk: str = Field(
        default="plugin", description="plugin: envelopes of posterior means; expected: E[envelope]; lcb: its "
        "lower quantile at risk_kappa sds")
    risk_kappa: float = Field(default=1.0, ge=0, description="sds below the envelope's centre that lcb scores")
    risk_samples: int = Field(default=64, ge=2, description="posterior samples of the HARP-C risk-aware envelope")
    active_rule: str = Field(
        default="verify_upside", description="verify_upside: the reference round; thompson / knowledge_gradient: "
        "leaves whose measurement can change the selection")
    active_samples: int = Field(default=32, ge=2, description="posterior samples of a Thompson active round")
    tsds_alpha: float = 0.5
    tsds_C: float = 5.0
    tsds_sigma: float = 0.75
    tsds_K: int = 100
    tsds_K_kde: int = 100
    exclude_contaminated: bool = Field(
        default=True, description="keep pool examples that nearly duplicate an eval or test item out of every selection")
    contamination_ngram: int = Field(default=13, ge=1, description="words per n-gram of the overlap test")
    contamination_coverage: float = Field(
        default=0.8, gt=0, le=1, description="share of an eval item's n-grams an example must contain to be flagged")
    contamination_cosine: float = Field(
        default=0.98, gt=0, le=1, description="embedding cosine at or above which an example is flagged")

    @field_validator("posterior_prior", "representative_rule", "envelope_risk", "active_rule")
    @classmethod
    def _known_option(cls, value: str, info: ValidationInfo) -> str:
        """An option outside its list fails at construction, naming the field and the valid values."""
        valid = {"posterior_prior": POSTERIOR_PRIORS, "representative_rule": REPRESENTATIVE_RULES,
                 "envelope_risk": ENVELOPE_RISKS, "active_rule": ACTIVE_RULES}[str(info.field_name)]
        if value not in valid:
            raise ValueError(f"{info.field_name}={value!r} is not one of {list(valid)}")
        return value

    def hierarchy_config(self) -> dict:
        cfg = {
            "leaf_size": self.leaf_size,
            "leaves_per_parent": self.leaves_per_parent,
            "parents_per_region": self.parents_per_region,
            "n_representatives": self.n_representatives,
        }
        if self.representative_rule != "central":  # the reference config stays exactly as it was
            cfg["representative_rule"] = self.representative_rule
        return cfg

    def posterior_options(self) -> dict:
        """Keywords of `stages.infer_posteriors` for these settings (empty: the reference model)."""
        out: dict = {}
        if self.posterior_prior != "tree":
            out["prior"] = self.posterior_prior
        if self.min_measured_regions != 2:
            out["min_measured_regions"] = self.min_measured_regions
        return out

    def selection_options(self) -> dict:
        """Keywords of `stages.select_harp` for these settings (empty: plug-in envelopes)."""
        if self.envelope_risk == "plugin":
            return {}
        return {"risk": self.envelope_risk, "risk_kappa": self.risk_kappa, "risk_samples": self.risk_samples,
                "risk_seed": self.seed}

    def tsds_params(self) -> dict:
        return {
            "alpha": self.tsds_alpha,
            "C": self.tsds_C,
            "sigma": self.tsds_sigma,
            "K": self.tsds_K,
            "K_kde": self.tsds_K_kde,
        }

    def as_json(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)


class ValidationSettings(BaseModel):
    """Where the validation group scores selections: a held-out test split never used for selection."""

    test_path: str = Field(description="held-out test split (eval-set format: JSONL or Parquet)")
    ground_truth_path: str | None = Field(
        default=None, description="optional example_id -> kind file (the demo's); gives harmful/redundant shares")
    seed: int = Field(default=0, description="training seed of the validation adapters")
    include_full_pool: bool = Field(default=True, description="also train on the whole pool (the costliest run)")

    @classmethod
    def from_env_or_demo(cls) -> ValidationSettings:
        """`HARP_TEST` (and `HARP_GROUND_TRUTH`) when set, else the demo's test split and ground truth."""
        test = os.environ.get("HARP_TEST")
        if test:
            return cls(test_path=test, ground_truth_path=os.environ.get("HARP_GROUND_TRUTH") or None)
        root = demo_root()
        return cls(test_path=str(root / "test.jsonl"), ground_truth_path=str(root / "ground_truth.parquet"))


def demo_root() -> Path:
    """The demo benchmark's folder: `HARP_DEMO_DIR`, else `$DAGSTER_HOME/demo`, else the repo's own.

    Never raises, so Definitions load (and the UI starts) before DAGSTER_HOME or the demo exist.
    """
    env = os.environ.get("HARP_DEMO_DIR")
    if env:
        return Path(env).expanduser().resolve()
    home = os.environ.get("DAGSTER_HOME")
    if home and Path(home).is_absolute():
        return Path(home) / "demo"
    return Path(__file__).resolve().parents[1] / "dagster_home" / "demo"
