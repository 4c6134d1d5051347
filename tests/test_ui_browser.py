"""The web UI in a real headless browser (Debian's chromium, driven by Playwright) against a
store holding runs made here: a base run with a planted spike, a fork of it, and a second run
with another learning rate. Screenshots of each page go to docs/screenshots/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from orchestrator.store import Store
from orchestrator.ui.server import start_in_thread
from tests.conftest import cli_json, run_cli, tiny_config

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOC_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
SHOTS = DOC_SHOTS  # set by the `ui` fixture
STEPS, SPIKE_STEP, SPIKE, FORK_STEP = 5000, 3217, 40.0, 2500
WAIT_MS = 60_000  # every wait is bounded, generously: chromium on a busy 2-core machine is slow
EVIL = '<img src=x onerror="document.title=1">'


def loss_curve(steps: np.ndarray, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed * 10 + rank)
    return 2.0 + 3.0 * np.exp(-steps / 800) + rng.normal(0, 0.03, len(steps))


def make_runs(store: Store) -> None:
    meta = {"git": {"commit": "0123abcd", "dirty": True}, "versions": {"python": "3.11", "torch": "2.13.0"},
            "workers": [{"rank": 0, "hostname": "node-a"}, {"rank": 1, "hostname": "node-b"}]}
    for rid, lr in (("base", 0.003), ("other", 0.001)):
        store.create_run(run_id=rid, name=f"gpt-{rid}", config={"optim": {"lr": lr}, "train": {"max_steps": STEPS}},
                         git_commit="0123abcd", host="node-a", command="orchestrator launch x.yaml", world_size=2,
                         meta=meta, tags={"team": "nlp", "note": EVIL})
        steps = np.arange(STEPS)
        for rank in (0, 1):
            loss = loss_curve(steps, rank, seed=len(rid))
            if rid == "base" and rank == 1:
                loss[SPIKE_STEP] = SPIKE  # one step on one rank: must survive bucketing
            store.points.append(rid, rank, 0, {
                "train/loss": (steps, loss), "train/tokens_per_s": (steps, np.full(STEPS, 1.0e4 + 100 * rank)),
                "sys/cpu_percent": (steps[::10], 50 + 10 * np.sin(steps[::10] / 200.0) + rank),
            })
        store.points.append(rid, 0, 0, {"eval/loss": (steps[99::100], loss_curve(steps[99::100], 0, 7))})
    store.start_attempt("base", 0, resumed_from_step=None)
    store.end_attempt("base", 0, "failed", cause="hang", message="rank 1 stopped", rank=1, failed_step=1800)
    store.start_attempt("base", 1, resumed_from_step=1500)
    store.end_attempt("base", 1, "completed")
    store.add_event("base", kind="loss_spike", severity="warning", message=f"loss spike {EVIL}", step=SPIKE_STEP, rank=1)
    store.finish_run("base", "completed", summary={"last_loss": 2.0, "restarts": 1})
    store.create_run(run_id="fork", name="gpt-fork", config={"optim": {"lr": 0.0005}, "train": {"max_steps": STEPS}},
                     git_commit="0123abcd", host="node-a", command="orchestrator fork base --step 2500", world_size=2,
                     parent="base", fork_step=FORK_STEP)
    steps = np.arange(FORK_STEP, 4000)
    for rank in (0, 1):
        store.points.append("fork", rank, 0, {"train/loss": (steps, loss_curve(steps, rank, 9) - 0.2)})


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: run `make sysdeps` (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install -e '.[test]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=WAIT_MS)
        try:
            yield b
        finally:
            b.close()


def new_page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page, errors


@pytest.fixture(scope="module")
def ui(browser, tmp_path_factory):
    root = tmp_path_factory.mktemp("uihome")
    make_runs(Store(root))
    server, _ = start_in_thread(store=Store(root), port=0)
    global SHOTS
    # `make screenshots` refreshes the ones in docs/; a plain test run keeps its own, the checkout stays clean
    SHOTS = DOC_SHOTS if os.environ.get("ORCHESTRATOR_SCREENSHOTS") else tmp_path_factory.mktemp("shots")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page, errors = new_page(browser)
    try:
        yield page, f"http://127.0.0.1:{server.server_address[1]}/", errors
    finally:
        page.close()
        server.shutdown()
        server.server_close()


def chart(page, key: str):
    return page.locator(f'.metric-card[data-key="{key}"] .chart').first


def wait_drawn(page, key: str, **attrs) -> dict:
    """Wait until the chart of `key` has drawn with the given data- attributes; return them all."""
    cond = " && ".join(f"d.{k} === {v!r}" for k, v in attrs.items()) or "true"
    page.wait_for_function(
        f"""() => {{ const c = document.querySelector('.metric-card[data-key="{key}"] .chart');
                    if (!c || !c.dataset.draws) return false; const d = c.dataset; return {cond}; }}""")
    return chart(page, key).evaluate("c => Object.assign({}, c.dataset)")


def shot(page, name: str) -> None:
    path = SHOTS / name
    page.screenshot(path=str(path))
    assert path.stat().st_size < 200_000, f"{name} is {path.stat().st_size} bytes"


def test_runs_table(ui):
    page, url, errors = ui
    page.goto(url)
    page.wait_for_selector('#runs-table[data-rows="3"]')
    ids = page.eval_on_selector_all("#runs-table tbody tr", "rows => rows.map(r => r.dataset.runId)")
    assert sorted(ids) == ["base", "fork", "other"]
    row = page.locator('#runs-table tr[data-run-id="fork"]')
    assert "base" in row.inner_text() and "@2500" in row.inner_text()  # parent and fork step
    assert page.locator("#runs-table img").count() == 0  # a tag holding HTML is shown as text
    assert EVIL in page.locator('#runs-table tr[data-run-id="base"]').inner_text()
    page.fill("#runs-filter", "other")
    page.wait_for_selector('#runs-table[data-rows="1"]')
    page.fill("#runs-filter", "")
    page.click('th[data-key="name"]')  # sort by name, ascending
    page.wait_for_function("() => document.querySelector('#runs-table tbody tr').dataset.runId === 'base'")
    shot(page, "runs.png")
    assert not errors, errors


def test_run_page_spike_zoom_and_ranks(ui):
    page, url, errors = ui
    page.goto(url + "#/run/base")
    d = wait_drawn(page, "train/loss")
    assert float(d["max"]) == SPIKE  # the one-step spike on rank 1 is the chart's maximum
    assert int(d["maxStep"]) <= SPIKE_STEP <= int(d["maxLastStep"])
    assert d["full"] == "false" and int(d["points"]) < STEPS  # bucketed on the server
    assert "node-b" in page.inner_text("main") and "0123abcd" in page.inner_text("main")
    assert page.locator("#events").inner_text().count("loss spike") == 1 and page.locator("main img").count() == 0
    assert "hang" in page.locator("#attempts").inner_text()
    page.wait_for_selector("#checkpoints table, #checkpoints p:not(:has-text('loading'))")
    shot(page, "run.png")

    # drag across steps SPIKE_STEP-20 .. SPIKE_STEP+20: the server answers at full resolution
    canvas = chart(page, "train/loss").locator("canvas")
    box = canvas.bounding_box()
    lo, hi = int(d["lo"]), int(d["hi"])
    left, plot_w = box["x"] + 58, box["width"] - 58 - 12  # chart.js PAD.left / PAD.right

    def x_of(step):
        return left + (step - lo) / (hi - lo) * plot_w

    y = box["y"] + box["height"] / 2
    page.mouse.move(x_of(SPIKE_STEP - 20), y)
    page.mouse.down()
    page.mouse.move(x_of(SPIKE_STEP + 20), y, steps=5)
    page.mouse.up()
    z = wait_drawn(page, "train/loss", full="true")
    assert int(z["hi"]) - int(z["lo"]) < 100
    assert int(z["points"]) == int(z["hi"]) - int(z["lo"]) + 1  # one point per step
    assert z["maxStep"] == z["maxLastStep"] == str(SPIKE_STEP) and float(z["max"]) == SPIKE
    shot(page, "run-zoomed.png")

    chart(page, "train/loss").locator("xpath=..").locator(".zoom-reset").click()
    wait_drawn(page, "train/loss", full="false")
    chart(page, "train/loss").locator("xpath=..").locator(".per-rank").check()
    r = wait_drawn(page, "train/loss", series="2")  # rank 0 and rank 1 overlaid
    assert float(r["max"]) == SPIKE
    page.locator('.metric-card[data-key="sys/cpu_percent"]').scroll_into_view_if_needed()
    wait_drawn(page, "sys/cpu_percent")
    assert not errors, errors


def test_compare_overlays_two_runs(ui):
    page, url, errors = ui
    page.goto(url)
    page.wait_for_selector('#runs-table[data-rows="3"]')
    page.check('#runs-table tr[data-run-id="base"] .select-run')
    page.check('#runs-table tr[data-run-id="other"] .select-run')
    page.click("#compare-selected")
    page.wait_for_function("() => location.hash.startsWith('#/compare')")
    d = wait_drawn(page, "train/loss", series="2")
    assert float(d["max"]) == SPIKE
    differs = page.eval_on_selector_all("#config-diff tr.differs", "rows => rows.map(r => r.dataset.key)")
    assert differs == ["optim.lr"]
    assert "0.003" in page.inner_text("#config-diff") and "0.001" in page.inner_text("#config-diff")
    shot(page, "compare.png")
    assert not errors, errors


def test_fork_lineage_and_inherited_history(ui):
    page, url, errors = ui
    page.goto(url + "#/run/fork")
    page.wait_for_selector("#lineage")
    node = page.locator('#lineage li[data-run-id="base"]')
    assert node.locator('li[data-run-id="fork"]').count() == 1  # the fork hangs under its parent
    assert "forked at step 2500" in node.locator('li[data-run-id="fork"]').inner_text()
    d = wait_drawn(page, "train/loss", series="2")  # inherited history (dashed) + the fork's own
    assert int(d["lo"]) == 0 and int(d["hi"]) == 3999
    assert float(d["max"]) < SPIKE  # the parent's spike at 3217 is after the fork step: not inherited
    shot(page, "lineage.png")
    assert not errors, errors



@pytest.mark.ray
def test_run_made_by_orchestrator_launch(browser, tmp_path, home, tiny_data, ray_address):
    """A real run (2 gloo ranks, tracked by the metrics actor) shows up with its charts."""
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 12, "eval_every": 6})
    run_cli("launch", str(cfg), "--address", ray_address, home=home, check=True)
    run_id = cli_json("runs", home=home)[0]["id"]
    server, _ = start_in_thread(store=Store(home), port=0)
    page, errors = new_page(browser)
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_selector(f'#runs-table tr[data-run-id="{run_id}"]')
        assert "completed" in page.locator(f'#runs-table tr[data-run-id="{run_id}"]').inner_text()
        page.click(f'#runs-table tr[data-run-id="{run_id}"] a')
        d = wait_drawn(page, "train/loss")
        assert d["lo"] == "0" and d["hi"] == "11" and d["full"] == "true"  # 12 steps: every one shown
        chart(page, "train/loss").locator("xpath=..").locator(".per-rank").check()
        wait_drawn(page, "train/loss", series="2")
        assert page.locator('.metric-card[data-key^="sys/"]').count() > 0  # system metrics per rank
        page.wait_for_selector("#checkpoints table, #checkpoints p:not(:has-text('loading'))")
        assert not errors, errors
    finally:
        page.close()
        server.shutdown()
        server.server_close()
