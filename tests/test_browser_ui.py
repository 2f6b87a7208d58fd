"""The Dagster UI in a real browser: Debian's Chromium driven by Playwright over a materialised tiny pipeline.

The UI serves `tests/ui_location.py` (the project's assets over the tiny pipeline's resources) on a copy of the
session's tiny pipeline. The test looks at the asset graph, `phi_posteriors`' heatmap and `leaf_utilities`'
partitions, then launches `lineage_catalog` with the Materialize button and follows the run to its success.
Assertions are on page content, checked against the instance; screenshots go under the test's tmp_path.
Playwright never downloads a browser: it launches the system's Chromium. Without one the test is skipped,
unless HARP_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from helpers import TinyPipeline, pipeline_defs, pipeline_resources
from ui_server import ROOT_VAR, webserver, write_instance_config, write_workspace

pytestmark = pytest.mark.slow

LOCATION = "harp_tiny"
LAUNCHED = "lineage_catalog"  # a light asset: reads stored tables, rebuilds the DuckDB catalog
VIEWPORT = {"width": 1920, "height": 1600}  # tall enough that every node of the largest group is drawn
RUN_TIMEOUT_MS = 240_000  # the run starts a process per step on a shared CPU


def _unavailable(why: str) -> None:
    if os.environ.get("HARP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"HARP_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")  # session scope: checked before the tiny pipeline is built
def chromium() -> str:
    """The system's Chromium (Debian's `chromium` package): Playwright is pointed at it, never downloads one."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _unavailable("no chromium or chromium-browser on PATH (Debian: apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed (make setup installs the test extra)")
    return path


@dataclass
class Ui:
    """The UI's base URL over a copy of the tiny pipeline, and where its instance, log and screenshots are."""

    url: str
    root: Path
    home: Path
    log: Path
    shots: Path

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:]


@pytest.fixture
def ui(tiny_pipeline: TinyPipeline, tmp_path: Path) -> Iterator[Ui]:
    """`dagster-webserver` on a free loopback port over this test's own copy of the materialised pipeline."""
    root = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline.root, root)
    home = root / "dagster_home"
    write_instance_config(home)
    workspace = write_workspace(tmp_path / "workspace.yaml", Path(__file__).with_name("ui_location.py"), LOCATION)
    env = {**os.environ, "DAGSTER_HOME": str(home), ROOT_VAR: str(root), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "DAGSTER_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    for var in ("HARP_POOL", "HARP_EVAL", "HARP_BASE_MODEL", "HARP_DEMO_DIR"):
        env.pop(var, None)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    log = tmp_path / "webserver.log"
    with webserver(workspace, env, log) as url:
        yield Ui(url=url, root=root, home=home, log=log, shots=shots)


def _groups(root: Path) -> dict[str, list[str]]:
    """Asset names by group, from the same definitions the UI serves."""
    groups: dict[str, list[str]] = {}
    for spec in pipeline_defs(pipeline_resources(root)).resolve_all_asset_specs():
        groups.setdefault(spec.group_name, []).append(spec.key.to_user_string())
    return {g: sorted(keys) for g, keys in sorted(groups.items())}


def _latest(instance: dg.DagsterInstance, key: str, partition: str | None = None) -> Any:
    event = instance.get_latest_materialization_event(dg.AssetKey(key)) if partition is None else next(
        r.event_log_entry for r in instance.fetch_materializations(dg.AssetKey(key), limit=50).records
        if r.partition_key == partition)
    assert event is not None, f"{key} has no materialisation in the instance"
    return event


def test_ui_shows_the_graph_heatmap_partitions_and_launches_a_run(chromium: str, ui: Ui) -> None:
    from playwright.sync_api import expect, sync_playwright

    groups = _groups(ui.root)
    assert {"prepare", "measure", "select", "validation"} <= set(groups), groups
    with dg.DagsterInstance.from_config(str(ui.home)) as instance:
        heatmap_md = _latest(instance, "phi_posteriors").asset_materialization.metadata["phi_heatmap"].value
        leaves = sorted(instance.get_dynamic_partitions("leaves"))
        measured = sorted(instance.get_materialized_partitions(dg.AssetKey("leaf_utilities")))
        leaf = measured[0]
        leaf_md = _latest(instance, "leaf_utilities", leaf)
        runs_before = {r.run_id for r in instance.get_runs()}
    assert measured and set(measured) <= set(leaves), (measured, leaves)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)

            # The asset graph: one node per group, then each group's own graph with every one of its assets.
            page.goto(f"{ui.url}/asset-groups")
            for group in groups:  # the collapsed group nodes drawn in the graph
                expect(page.locator("foreignObject.group").get_by_text(group, exact=True)).to_be_visible()
            page.screenshot(path=ui.shots / "lineage.png")
            for group, assets in groups.items():
                page.goto(f"{ui.url}/locations/{LOCATION}/asset-groups/{group}/lineage")
                expect(page.get_by_text(f"Asset Group in {LOCATION}")).to_be_visible()
                for asset in assets:  # an asset node (other groups' assets are drawn as plain links)
                    expect(page.locator(f'[data-tooltip="{asset}"]')).to_be_visible()
                page.screenshot(path=ui.shots / f"group-{group}.png")

            # phi_posteriors: its heatmap, an image the browser decoded, is the one the instance stores.
            page.goto(f"{ui.url}/assets/phi_posteriors")
            expect(page.get_by_text("phi_heatmap", exact=True)).to_be_visible()
            page.get_by_role("row").filter(has_text="phi_heatmap").get_by_text("[Show Markdown]").click()
            dialog = page.get_by_role("dialog")
            expect(dialog.get_by_text("phi_heatmap")).to_be_visible()
            image = dialog.get_by_role("img", name="phi heatmap")
            expect(image).to_be_visible()
            width, height = image.evaluate("e => [e.naturalWidth, e.naturalHeight]")
            assert width > 100 and height > 100, (width, height)
            src = image.get_attribute("src") or ""
            assert src.startswith("data:image/png;base64,") and src in heatmap_md, src[:80]
            page.screenshot(path=ui.shots / "phi_posteriors-heatmap.png")
            dialog.get_by_role("button", name="Close").click()

            # leaf_utilities' partitions: the counts, every leaf, and a measured leaf's own materialisation.
            page.goto(f"{ui.url}/assets/leaf_utilities?view=partitions")
            expect(page.get_by_text(f"Materialized ({len(measured)})")).to_be_visible()
            expect(page.get_by_text(f"Missing ({len(leaves) - len(measured)})")).to_be_visible()
            expect(page.get_by_text(f"{len(leaves)} Partitions Selected")).to_be_visible()
            for key in leaves:
                expect(page.get_by_text(key, exact=True).first).to_be_visible()
            page.get_by_text(leaf, exact=True).first.click()
            expect(page).to_have_url(re.compile(f"partition={leaf}"))
            details = {k: v.value for k, v in leaf_md.asset_materialization.metadata.items()}
            expect(page.get_by_text(leaf_md.run_id[:8], exact=True)).to_be_visible()
            for field in ("data_version", "member_hash"):
                expect(page.get_by_text(str(details[field]), exact=True)).to_be_visible()
            page.screenshot(path=ui.shots / f"leaf_utilities-{leaf}.png")

            # Materialize lineage_catalog by clicking, open the launched run and wait for its success.
            page.goto(f"{ui.url}/assets/{LAUNCHED}")
            page.get_by_role("button", name="materialization Materialize", exact=True).click()
            launched = page.get_by_text("Launched run")
            expect(launched).to_be_visible(timeout=120_000)
            page.screenshot(path=ui.shots / "launched.png")
            page.get_by_role("link", name="View", exact=True).click()
            expect(page).to_have_url(re.compile("/runs/[0-9a-f-]{36}"))
            run_id = page.url.split("/runs/", 1)[1].split("?", 1)[0]
            try:
                expect(page.get_by_role("img", name="run_success")).to_be_visible(timeout=RUN_TIMEOUT_MS)
            except AssertionError:
                page.screenshot(path=ui.shots / "run-not-successful.png")
                with dg.DagsterInstance.from_config(str(ui.home)) as instance:
                    run = instance.get_run_by_id(run_id)
                    status = run.status if run else None
                raise AssertionError(f"run {run_id} did not show success in the UI (instance: {status}); "
                                     f"webserver log: {ui.log_tail()}") from None
            expect(page.get_by_text("Success", exact=True)).to_be_visible()
            expect(page.get_by_text("Succeeded (1)")).to_be_visible()
            expect(page.get_by_text("RUN_SUCCESS", exact=True)).to_be_visible()
            page.screenshot(path=ui.shots / "run-success.png")
        finally:
            browser.close()

    # The instance agrees: one new run, successful, for exactly that asset, which it materialised.
    with dg.DagsterInstance.from_config(str(ui.home)) as instance:
        new = [r for r in instance.get_runs() if r.run_id not in runs_before]
        assert [r.run_id for r in new] == [run_id], [(r.run_id, r.job_name) for r in new]
        assert new[0].status == dg.DagsterRunStatus.SUCCESS, new[0].status
        assert new[0].asset_selection == {dg.AssetKey(LAUNCHED)}
        assert _latest(instance, LAUNCHED).run_id == run_id
    for name in ("lineage.png", "phi_posteriors-heatmap.png", "run-success.png"):
        assert (ui.shots / name).stat().st_size > 0, name
