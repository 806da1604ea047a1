"""MLflow links we print or write open the training-runs view (issue 23.2): MLflow 3.17's UI opens the GenAI
pages in a fresh browser unless the URL says ``workflowType=machine_learning``. Checked by loading the printed links
in headless Chromium with a fresh profile against a real ``mlflow server``."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from lora_moe_core.tracking.links import LOCAL_UI, experiment_link, mlflow_link
from lora_moe_core.tracking.tracker import start_tracker

# The two sidebars of MLflow 3.17.2's UI: GenAI's lists these; the "Model training" one lists Runs, Models,
# Traces, Model registry.
GENAI_NAV = ("Observability", "Sessions", "Judges")


def test_server_link_names_the_runs_view_without_credentials():
    link = mlflow_link("https://lora-moe:s3cr3t-pass@mlflow.example.com/prefix/", "7", "abc123")
    assert str(link) == "https://mlflow.example.com/prefix/#/experiments/7/runs/abc123?workflowType=machine_learning"
    assert link.command is None
    assert mlflow_link("http://127.0.0.1:5000", "0").url == (
        "http://127.0.0.1:5000/#/experiments/0/runs?workflowType=machine_learning"
    )


def test_local_store_link_says_which_mlflow_ui_serves_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    link = mlflow_link(uri, "1")
    assert link.command == f"mlflow ui --backend-store-uri {uri}"
    assert str(link) == f"{link.command}, then open {LOCAL_UI}/#/experiments/1/runs?workflowType=machine_learning"
    assert experiment_link(uri, "lora-moe") is None and not (tmp_path / "mlruns.db").exists()  # no store made
    assert experiment_link("none", "lora-moe") is None


def _dom(url: str) -> str:
    """The DOM of ``url`` after MLflow's app rendered, in a browser that never ran MLflow (fresh profile)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian chromium is not installed (make test installs it)")
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                   "--virtual-time-budget=15000", "--dump-dom", url]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=90).stdout


def _title(dom: str) -> str:
    match = re.search(r"<title>([^<]*)</title>", dom)
    return match.group(1) if match else ""


def test_printed_links_open_the_runs_view_in_a_fresh_browser(mlflow_server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    with start_tracker("links-probe-run", experiment="links", tracking_uri=mlflow_server.uri,
                       output_dir=tmp_path) as tracker:  # fmt: skip
        tracker.log_metrics({"loss": 1.0}, step=0)
    out = capsys.readouterr().out
    assert "View run" not in out  # MLflow's own line (GenAI view) is replaced by ours
    [run_url] = re.findall(r"^MLflow run links-probe-run: (\S+)$", out, re.MULTILINE)
    experiment_id = tracker.experiment_id
    assert run_url == f"{mlflow_server.uri}/#/experiments/{experiment_id}/runs/{tracker.run_id}?workflowType=" \
                      "machine_learning"  # fmt: skip
    runs_url = str(experiment_link(mlflow_server.uri, "links"))  # what `make run`'s summary prints

    runs = _dom(runs_url)
    assert _title(runs).startswith("Runs - Experiment"), _title(runs)
    assert "Run Name" in runs and "links-probe-run" in runs  # the runs table, with our run in it
    assert not [word for word in GENAI_NAV if word in runs]
    page = _dom(run_url)
    assert "links-probe-run" in page and "About this run" in page and tracker.run_id in page
    assert not [word for word in GENAI_NAV if word in page]
    # the control: the bare experiment link (MLflow's own) opens GenAI's Overview, so the checks above can fail
    bare = _dom(f"{mlflow_server.uri}/#/experiments/{experiment_id}")
    assert _title(bare).startswith("Overview") and all(word in bare for word in GENAI_NAV), _title(bare)


def test_report_links_to_its_mlflow_run(tmp_path):
    from lora_moe_core.evaluation.report import write_report

    links = [("this evaluation's run", mlflow_link(f"sqlite:///{tmp_path / 'm.db'}", "3", "r1")),
             ("the pipeline run", mlflow_link(f"sqlite:///{tmp_path / 'm.db'}", "3", "p0"))]  # fmt: skip
    page = write_report({}, [], [], Path(tmp_path / "report.html"), links).read_text()
    assert f'<a href="{LOCAL_UI}/#/experiments/3/runs/r1?workflowType=machine_learning">this evaluation' in page
    assert page.count("/runs/p0?workflowType=machine_learning") == 1
    assert page.count(f"<code>mlflow ui --backend-store-uri sqlite:///{tmp_path / 'm.db'}</code>") == 1


def test_make_run_summary_ends_with_the_runs_view_link(tmp_path):
    from mlflow import MlflowClient

    from pipelines.local_run import LocalResult

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_tracker("stage2", tracking_uri=uri, output_dir=tmp_path).close()  # experiment lora-moe, as a run makes
    experiment_id = MlflowClient(uri).get_experiment_by_name("lora-moe").experiment_id
    lines = LocalResult(12.0, {}, uri, None).summary()
    assert lines[-1] == (f"  MLflow runs:          mlflow ui --backend-store-uri {uri}, then open {LOCAL_UI}/"
                         f"#/experiments/{experiment_id}/runs?workflowType=machine_learning")  # fmt: skip
    missing = LocalResult(1.0, {}, f"sqlite:///{tmp_path / 'none.db'}", None, "other").summary()[-1]
    assert missing.endswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'none.db'}")  # no store yet
