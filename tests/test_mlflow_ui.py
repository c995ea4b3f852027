"""The MLflow UI over a real sweep, loaded in headless Chromium: the trial runs and their MAE are shown.

`make test` installs Debian's chromium; without a browser binary this test skips (and says so).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request

import mlflow
import pytest
from cluster_sim import free_ports

from distalign_ray.config import EstimateConfig, FinetuneConfig
from distalign_ray.data.specs import load_dataset
from distalign_ray.estimate import run_estimate
from distalign_ray.tracking.mlflow_store import experiment_url, ui_command
from distalign_ray.tuning.sweep import SweepConfig, run_sweep

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _rendered_dom(url: str, profile, width: int = 1600) -> str:
    """The DOM after the page's scripts ran (virtual time lets the React app fetch and render)."""
    command = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={profile}",
        f"--window-size={width},8000",  # the runs table draws only the columns that fit
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def _visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(BROWSER is None, reason="no chromium binary (make test installs Debian's chromium)")
def test_sweep_trials_and_mae_in_the_mlflow_ui(ray_cluster, tiny_model_path, mlflow_uri, tmp_path, monkeypatch):
    cfg = SweepConfig(
        name="ui-sweep",
        num_samples=2,
        finetune=FinetuneConfig(
            model=tiny_model_path, num_workers=1, cpus_per_worker=0.5, epochs=1, sft_epochs=1, max_contexts=2, binding_check="report"
        ),
        output=str(tmp_path / "best.yaml"),
        min_answer_mass=0.0,  # a random tiny model answers with no class
    )
    spec = load_dataset("gender-us-real")
    result = run_sweep(spec, cfg)
    estimate = run_estimate(
        spec, EstimateConfig(model=tiny_model_path, samples_per_context=7, samples_per_request=7, max_contexts=2, max_new_tokens=4)
    )
    experiment = mlflow.get_experiment_by_name("distalign")
    trials = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(trials) == 2

    (port,) = free_ports(1)
    argv, env = ui_command(port=port)
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "MLflow server did not come up"
                time.sleep(1)
        # Each trial's run page shows its name and its MAE on held-out templates (val_mae).
        for _, trial in trials.iterrows():
            url = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs/{trial['run_id']}"
            text = _visible_text(_rendered_dom(url, tmp_path / f"profile-{trial['run_id']}"))
            assert trial["tags.mlflow.runName"] in text, f"trial {trial['tags.mlflow.runName']} not shown"
            value = repr(float(trial["metrics.val_mae"]))[:8]  # the page prints the full float
            assert re.search(r"val_mae\s+" + re.escape(value), text), f"val_mae {value}... not shown"
        # The experiment has the kind of a training experiment (older UIs open their runs table by it).
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        # `distalign ui` prints this link: the runs table of the "Model training" view, opened on the
        # project's saved view, whose columns show each estimate's MAE and each trial's val_mae.
        first_page = _visible_text(
            _rendered_dom(experiment_url(experiment.experiment_id, f"http://127.0.0.1:{port}"), tmp_path / "p2", width=4000)
        )
        assert "sweep-ui-sweep" in first_page and "4 matching runs" in first_page, first_page[:2000]
        assert "Detect Issues" not in first_page and "Traces 0" not in first_page
        header = first_page[first_page.index("Run Name") : first_page.index("Hide run")]
        assert re.search(r"\bmae\b", header) and "val_mae" in header, header
        mae = estimate.report.mae
        assert re.search(rf"\b{re.escape(str(round(mae, 4))[:5])}", first_page), f"mae {mae} not in the runs table: {first_page[:3000]}"
    finally:
        server.terminate()
        server.wait(timeout=30)
