"""`lora-moe evaluate` and `register`: metrics.json keys, report.html in headless Chromium, registry, bad input;
LoRA-MoE vs the matched single-LoRA arm (`lora-moe train --baseline_arm`, issue 25) in metrics, report and MLflow."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lora_moe_core.cli.main import main
from tests.helpers import assert_one_line_error, unlabelled_copy

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
FAMILIES = ("Scissors", "Hook", "Suction", "Other")


@pytest.fixture(scope="module")
def trained(tiny_cache, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluated")
    assert main(["train", "--config", str(DEMO / "vanilla_lora.toml"), "--cache", tiny_cache,
                 "--output_dir", str(root / "stage1"), "--num_train_epochs", "2"]) == 0  # fmt: skip
    stage1 = root / "stage1" / "lora_final.safetensors"
    stage2 = ["train", "--config", str(DEMO / "lora_moe_stage_b_merged.toml"), "--cache", tiny_cache,
              "--base_lora_weights", str(stage1), "--output_dir", str(root / "stage2"),
              "--num_train_epochs", "4"]  # fmt: skip
    assert main(stage2) == 0
    assert main([*stage2, "--baseline_arm"]) == 0  # the same command: its matched single LoRA, beside Stage 2
    assert main(["train-classifier", "--cache", tiny_cache, "--output", str(root / "classifier.safetensors"),
                 "--epochs", "2"]) == 0  # fmt: skip
    return {"root": root, "stage1": stage1, "stage2": root / "stage2" / "lora_moe_final.safetensors",
            "arm": root / "stage2_matched_lora" / "lora_final.safetensors",
            "classifier": root / "classifier.safetensors"}  # fmt: skip


def _evaluate_argv(trained, cache: str, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--task", "tiny", "--lora_moe_weights", str(trained["stage2"]), "--base_lora_weights",
            str(trained["stage1"]), "--cache", cache, "--output_dir", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(trained, tiny_cache) -> Path:
    out = trained["root"] / "eval"
    argv = _evaluate_argv(trained, tiny_cache, out, "--classifier_weights", str(trained["classifier"]),
                          "--samples_per_family", "1", "--sample_steps", "2", "--sample_size", "32", "32", "9",
                          "--matched_lora_weights", str(trained["arm"]))  # fmt: skip
    assert main(argv) == 0
    return out


def test_metrics_json_is_flat_and_has_the_documented_keys(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert all(isinstance(value, int | float) for value in metrics.values())
    for family in FAMILIES:
        for model in ("base", "stage1", "stage2"):
            assert f"val_loss.{family}.{model}" in metrics
        assert f"roi_loss.{family}.stage1" in metrics and f"roi_loss.{family}.stage2" in metrics
        assert 0.0 <= metrics[f"usage.{family}"] <= 1.0
    assert metrics["routing.accuracy"] == 1.0  # routed by the caption labels it was trained with
    assert 0 < metrics["routing.usage_entropy"] <= 1.3863
    assert 0 <= metrics["routing.gate_entropy_per_clip"] <= 1.3863
    assert sum(metrics[f"routing.confusion.{f}.{e}"] for f in FAMILIES for e in FAMILIES) == 8
    assert {"samples.flicker", "samples.presence_accuracy", "samples.frechet_classifier"} <= metrics.keys()
    assert len(list((evaluated / "samples").glob("*_stage1.mp4"))) == 4  # Stage 1 beside each Stage-2 clip
    assert len(list((evaluated / "samples").glob("*.mp4"))) == 8


def test_metrics_json_has_the_specialisation_evidence(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    present = [f for f in FAMILIES if f"val_loss.{f}.stage2" in metrics]
    assert len(present) >= 2
    for family in present:
        row = [metrics[f"misrouting.{family}.{expert}"] for expert in FAMILIES]
        assert all(value > 0 for value in row)
        own = row[FAMILIES.index(family)]
        increase = (sum(row) - own) / 3 / own - 1
        assert metrics[f"misrouting.wrong_expert_increase.{family}"] == pytest.approx(increase)
    assert metrics["specialisation.ci_low"] <= metrics["specialisation.score"] <= metrics["specialisation.ci_high"]
    # the learned route on the same (t, noise) pairs is exactly what val_loss.all.stage2 measured
    assert metrics["gates.learned.val_loss"] == pytest.approx(metrics["val_loss.all.stage2"], rel=1e-5)
    assert metrics["gates.uniform.val_loss"] > 0


def test_the_arm_is_trained_as_matched(trained):
    """`train --baseline_arm` on the Stage-2 command: a plain LoRA of 4× the experts' ranks, same steps."""
    from lora_moe_core.formats.lora_files import read_lora

    arm = read_lora(trained["arm"])
    assert arm.format == "musubi" and arm.modules["blocks.3.attn1.to_q"].rank == 32
    assert arm.modules["blocks.1.ffn.net.0.proj"].rank == 16 and "blocks.0.ffn.net.0.proj" not in arm.modules
    assert sum(m.down.numel() + m.up.numel() for m in arm.modules.values()) == 18_048
    config = json.loads(arm.metadata["lora_moe.config"])
    assert config["training"]["baseline_arm"] and config["lora_moe"]["base_lora_weights"] == str(trained["stage1"])
    steps = [json.loads((path.parent / "training_state_final.json").read_text())["step"]
             for path in (trained["stage2"], trained["arm"])]  # fmt: skip
    assert steps == [16, 16]  # 8 clips, 2 per optimizer step, 4 epochs each
    assert any(m.up.abs().sum() > 0 for m in arm.modules.values())


def test_metrics_compare_lora_moe_with_the_matched_lora(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert (metrics["params.trainable.stage2"], metrics["params.trainable.matched_lora"]) == (18_636, 18_048)
    assert metrics["steps.stage2"] == metrics["steps.matched_lora"] == 16
    groups = [group for group in (*FAMILIES, "all") if f"vs_matched_lora.{group}.difference" in metrics]
    assert len(groups) == 5 and metrics["vs_matched_lora.all.clips"] == 8
    for group in groups:
        moe, lora = metrics[f"val_loss.{group}.stage2"], metrics[f"val_loss.{group}.matched_lora"]
        # the arms' per-clip losses at the very (t, noise) pairs val_loss.*.stage2 averages
        assert metrics[f"vs_matched_lora.{group}.difference"] == pytest.approx(moe - lora, abs=1e-6)
        assert metrics[f"vs_matched_lora.{group}.relative"] == pytest.approx(moe / lora - 1, abs=1e-6)
        assert metrics[f"vs_matched_lora.{group}.ci_low"] <= metrics[f"vs_matched_lora.{group}.ci_high"]
        assert lora != moe and lora < metrics[f"val_loss.{group}.base"]  # a trained arm, not Stage 2 or the base


def test_both_arms_are_mlflow_runs_with_the_same_metric_names(evaluated):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{evaluated / 'mlruns.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("lora-moe").experiment_id])}
    evaluation, moe, lora = runs["evaluate-eval"], runs["arm-lora_moe"], runs["arm-matched_lora"]
    names = {*(f"val_loss.{group}" for group in (*FAMILIES, "all")), "trainable_parameters", "train_steps"}
    assert set(moe.data.metrics) == set(lora.data.metrics) == names
    assert (moe.data.metrics["trainable_parameters"], lora.data.metrics["trainable_parameters"]) == (18_636, 18_048)
    assert moe.data.metrics["val_loss.all"] == evaluation.data.metrics["val_loss.all.stage2"]
    assert lora.data.metrics["val_loss.all"] == evaluation.data.metrics["val_loss.all.matched_lora"]
    for run in (moe, lora):  # a plain `lora-moe evaluate` has no pipeline parent: they sit under its run
        assert run.info.status == "FINISHED" and run.data.tags["stage"] == "arm"
        assert run.data.tags["mlflow.parentRunId"] == evaluation.info.run_id


def test_the_report_opens_with_lora_moe_vs_the_matched_lora(evaluated):
    page = (evaluated / "report.html").read_text()
    body = page[page.index("<body>") :]
    assert body.index("<h2>LoRA-MoE vs matched LoRA</h2>") < body.index("<h2>") + 1  # the first section
    metrics = json.loads((evaluated / "metrics.json").read_text())
    difference, low, high = (metrics[f"vs_matched_lora.all.{key}"] for key in ("difference", "ci_low", "ci_high"))
    assert "<th>all</th><td>8</td>" in body and f"{difference:+.4f} ({low:+.4f} to {high:+.4f})" in body
    assert "Trainable parameters: LoRA-MoE 18,636" in body and "matched LoRA 18,048" in body


def test_stage2_fits_held_out_clips_better_than_stage1(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["val_loss.all.stage2"] < metrics["val_loss.all.stage1"] < metrics["val_loss.all.base"]


def _chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian chromium is not installed (make test installs it)")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
               "--virtual-time-budget=5000", "--hide-scrollbars", *arguments]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_renders_its_plots_in_headless_chromium(evaluated, tmp_path):
    dom = _chromium(tmp_path, "--dump-dom", (evaluated / "report.html").as_uri()).stdout
    # training curves, losses, confusion, gates per family, gate vs timestep, misrouting matrix
    assert 'data-images-loaded="6"' in dom and 'data-images-broken="0"' in dom, dom[-500:]
    assert "misrouting.wrong_expert_increase" in dom and "specialisation score" in dom
    assert dom.count("<video") == 8 and dom.count('class="pair"') == 4 and dom.count('poster="samples/') == 8
    assert dom.count("Stage 1 (base LoRA)") == 4 and dom.count("Stage 2 (LoRA-MoE)") == 4
    assert "Held-out results by family" in dom and dom.index("Held-out results") < dom.index("<h2>Plots")
    # the evaluation's MLflow run, in the runs view of the `mlflow ui` that serves this local store
    assert re.search(r'<a href="http://127.0.0.1:5000/#/experiments/\d+/runs/\w+\?workflowType=machine_learning">'
                     "this evaluation's run</a>", dom), dom[:3000]  # fmt: skip
    assert f"<code>mlflow ui --backend-store-uri sqlite:///{evaluated / 'mlruns.db'}</code>" in dom


def test_report_screenshot_shows_the_table_and_plots(evaluated, tmp_path):
    """What a reader sees: a screenshot of the page's first screen holds the family table and drawn plots."""
    from PIL import Image

    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2200", (evaluated / "report.html").as_uri())
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2200)
    pixels = np.asarray(image).reshape(-1, 3)
    ink = (pixels.min(axis=1) < 200).mean()  # share of pixels that are not (near) white
    colours = len(np.unique(pixels[::7], axis=0))
    assert 0.03 < ink < 0.9, ink  # a page with content, not a blank or an error screen
    assert colours > 200, colours  # plots and video frames, not text alone


def test_register_creates_a_candidate_version(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    argv = ["register", "--lora_moe_weights", str(trained["stage2"]), "--name", "surgical", "--work_dir", str(tmp_path)]
    assert main(argv) == 0
    assert "registered surgical version 1 (alias 'candidate')" in capsys.readouterr().out
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    version = client.get_model_version_by_alias("surgical", "candidate")
    assert str(version.version) == "1"
    exported = sorted(p.name for p in (tmp_path / "model" / "exported").glob("*.safetensors"))
    assert any(name.startswith("Hook") for name in exported) and len(exported) >= 4


def test_bad_evaluation_inputs(trained, tiny_cache, tmp_path, capsys):
    def fails(argv, *words):
        assert_one_line_error(capsys, argv, *words)

    fails(_evaluate_argv(trained, tiny_cache, tmp_path / "e", "--samples_per_family", "0", "--matched_lora_weights",
                         str(trained["stage1"])), "is not a matched-LoRA arm", "--baseline_arm")  # fmt: skip
    assert not (tmp_path / "e").exists()  # refused before any output

    unlabelled = unlabelled_copy(tiny_cache, tmp_path / "unlabelled")
    fails(_evaluate_argv(trained, unlabelled, tmp_path / "e", "--samples_per_family", "0"), "no instrument labels")
    fails(_evaluate_argv(trained, tiny_cache, tmp_path / "e", "--samples_per_family", "0", "--task", "t2v-A14B"),
          "--model is required")  # fmt: skip
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fails(_evaluate_argv(trained, tiny_cache, blocker / "out", "--samples_per_family", "0"), "cannot create")


def test_family_table_and_training_curves(tmp_path):
    """The report's compact table reads the flat metrics; the curves plot Stage 2 after Stage 1."""
    from lora_moe_core.evaluation.curves import plot_training_curves
    from lora_moe_core.evaluation.report import family_rows

    metrics = {"val_loss.Hook.base": 3.0, "val_loss.Hook.stage1": 2.0, "val_loss.Hook.stage2": 1.5, "usage.Hook": 0.4,
               "misrouting.Hook.Hook": 1.5, "misrouting.wrong_expert_increase.Hook": 0.08}  # fmt: skip
    rows = {row[0]: row for row in family_rows(metrics)}
    assert rows["Hook"] == ["Hook", "3.0000", "2.0000", "1.5000", "-25.0%", "–", "1.5000", "+8.0%", "40%"]
    assert rows["Scissors"][1:] == ["–"] * 8
    histories = {"stage1": [{"epoch": 1, "diffusion_loss": 3.0}, {"epoch": 2, "diffusion_loss": 2.5}],
                 "stage2": [{"epoch": 1, "diffusion_loss": 2.4, "roi_loss": 2.6}]}  # fmt: skip
    path = plot_training_curves(histories, tmp_path / "curves.png")
    assert path.stat().st_size > 5000


def test_training_curves_number_stage2_epochs_after_stage1():
    from lora_moe_core.evaluation.curves import curve_series

    histories = {"stage2": [{"epoch": 1, "diffusion_loss": 0.9, "roi_loss": 1.1}, {"epoch": 2, "diffusion_loss": 0.8}],
                 "stage1": [{"epoch": e, "diffusion_loss": 1.5 - 0.1 * e} for e in (1, 2, 3, 4)]}  # fmt: skip
    series, markers = curve_series(histories)
    got = {line.label: (line.epochs, [round(v, 4) for v in line.values]) for line in series}
    assert got["stage1 diffusion_loss"] == ([1, 2, 3, 4], [1.4, 1.3, 1.2, 1.1])  # Stage 1 first, whatever the order
    assert got["stage2 diffusion_loss"] == ([5, 6], [0.9, 0.8])
    assert got["stage2 roi_loss"][0] == [5, 6] and got["stage2 roi_loss"][1][0] == 1.1
    assert "stage1 roi_loss" not in got and markers == [4.5, 6.5]


class _Metrics:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def log_metric(self, key: str, value: float) -> None:
        self.values[key] = value


def test_evaluate_step_plots_both_stages_from_the_store(trained, tiny_cache, tmp_path, monkeypatch):
    """The pipeline's evaluate step reads Stage 2 from a KFP artifact file, whose folder holds no training state
    (make run's report showed Stage 1 only): the curves come from the state files beside the weights in the store.
    The matched arm arrives as a URI in the store: its comparison and step count reach the step's KFP metrics."""
    import types

    from components.evaluate import evaluate
    from lora_moe_core.evaluation import curves

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")
    artifact = tmp_path / "kfp" / "lora_moe"  # what kfp.local hands the step: a bare file
    artifact.parent.mkdir()
    shutil.copy(trained["stage2"], artifact)
    seen: list[dict] = []
    plot = curves.plot_training_curves
    monkeypatch.setattr(curves, "plot_training_curves", lambda histories, path: seen.append(histories) or plot(
        histories, path))  # fmt: skip
    lora_moe = types.SimpleNamespace(path=str(artifact), metadata={"uri": str(trained["stage2"])})
    report = types.SimpleNamespace(path=str(tmp_path / "report.html"))
    evaluate.python_func(eval_cache_uri=tiny_cache, lora_moe=lora_moe, stage1_lora_uri=str(trained["stage1"]),
                         task="tiny", base_model_uri="", dit_uri="", dit_high_noise_uri="", vae_uri="", t5_uri="",
                         samples_per_family=0, sample_steps=2, sample_width=32, sample_height=32, sample_frames=9,
                         seed=0, metrics=(kfp_metrics := _Metrics()), report=report, tracking={},
                         kfp_task_name="evaluate", matched_lora_uri=str(trained["arm"]), eval_clips=0,
                         eval_timesteps=[0.3, 0.6, 0.9, 0.95])  # fmt: skip
    [histories] = seen
    assert kfp_metrics.values["steps.matched_lora"] == kfp_metrics.values["steps.stage2"] == 16
    assert "vs_matched_lora.all.ci_high" in kfp_metrics.values
    assert [record["epoch"] for record in histories["stage1"]] == [1, 2]  # the fixture's --num_train_epochs
    assert [record["epoch"] for record in histories["stage2"]] == [1, 2, 3, 4]
    assert "training_curves" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize(
    ("interval", "words"),
    [((-0.0030, -0.0041, -0.0019), ("The experts specialise", "0.0030, 0.30% of the held-out loss", "below 0")),
     ((0.0002, -0.0004, 0.0008), ("No evidence of specialisation", "interval includes 0")),
     ((0.0007, 0.0001, 0.0012), ("No sign of specialisation", "slightly worse", "0.0007, 0.07% of the held-out loss",
                                 "above 0"))],
)  # fmt: skip
def test_report_headline_says_what_the_specialisation_interval_means(interval, words):
    from lora_moe_core.evaluation.report import _summary

    score, low, high = interval
    metrics = {"routing.accuracy": 1.0, "specialisation.score": score, "specialisation.ci_low": low,
               "specialisation.ci_high": high, "val_loss.all.stage2": 1.0}  # fmt: skip
    text = _summary(metrics)
    assert f"specialisation score {score:+.4f} (95% CI {low:+.4f} to {high:+.4f})" in text  # numbers beside words
    for word in words:
        assert word in text, text
