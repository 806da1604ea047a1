"""Security of what a command reads (issues 26 and 27): a tampered input must not exfiltrate a file, plant a
database, destroy another input, leak a credential or escape its folder.

1. ``sync-tracking`` replays a fallback file: it uploads only files inside the run folder that wrote it (symlinks
   resolved) and sends only where the user says (``--tracking_uri`` / ``MLFLOW_TRACKING_URI``), never where the
   file's header claims. A planted secret must never reach MLflow.
2. ``--resume`` reads a training state only after checking all of it: bounded JSON from a regular file, every
   field of the type and shape the trainer writes, optimizer moments of this run's shapes, files named inside the
   run's own folder; a refused resume writes nothing (no folder, no tracking run).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest

from lora_moe_core.cli.main import main
from lora_moe_core.tracking.tracker import FALLBACK_FILE, start_tracker
from tests import test_faults_training as faults
from tests.test_faults_training import DEMO, RUN, _assert_same_run, _resumed_step, _stage2_argv

# the fault tests' fixtures: tracking off, the Stage-1 LoRA, the uninterrupted Stage-2 run with a save per step
_no_tracking, stage1, reference = faults._no_tracking, faults.stage1, faults.reference

SECRET_TEXT = "-----BEGIN OPENSSH PRIVATE KEY----- planted-7c1e0f"


def _one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one ``error:`` line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _files_holding(root: Path, text: str, skip: Path) -> list[Path]:
    """Every file under ``root`` (but ``skip``'s folder) whose bytes contain ``text``: where a secret went."""
    needle = text.encode()
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if not path.is_relative_to(skip) and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
    return found


@pytest.fixture
def outage_run(tmp_path: Path) -> Path:
    """A run folder whose tracker logged a params call and one of its own files while MLflow was down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.html").write_text("<p>ours</p>")
    tracker = start_tracker("evaluate", tracking_uri=down, output_dir=run)
    tracker.log_params({"lr": 1e-4})
    tracker.log_artifact(run / "report.html", "evaluation")
    tracker.close()
    home = tmp_path / "home" / ".ssh"
    home.mkdir(parents=True)
    (home / "id_ed25519").write_text(SECRET_TEXT)
    return run


def _plant(run: Path, **fields) -> None:
    """Append a call to the fallback file with the tracker id and run name of its first line."""
    fallback = run / FALLBACK_FILE
    first = json.loads(fallback.read_text().splitlines()[0])
    seq = 100 + len(fallback.read_text().splitlines())
    line = {"tracker": first["tracker"], "run_name": first["run_name"], "run_id": None, "seq": seq, **fields}
    with fallback.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


@pytest.mark.parametrize("how", ["absolute path", "dot-dot path", "symlink in the run", "symlink in a folder",
                                 "symlinked folder"])  # fmt: skip
def test_replay_uploads_no_file_from_outside_the_run(how, outage_run, tmp_path, capsys, monkeypatch) -> None:
    secret = tmp_path / "home" / ".ssh" / "id_ed25519"
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    (tmp_path / "store").mkdir()
    named = {"absolute path": secret, "dot-dot path": outage_run / ".." / "home" / ".ssh" / "id_ed25519"}.get(how)
    if how == "symlink in the run":
        named = outage_run / "notes.txt"
        named.symlink_to(secret)
    elif how == "symlink in a folder":
        named = outage_run / "plots"
        named.mkdir()
        (named / "a.png").write_bytes(b"png")
        (named / "key.png").symlink_to(secret)
    elif how == "symlinked folder":
        named = outage_run / "plots"
        named.mkdir()
        (named / "ssh").symlink_to(secret.parent, target_is_directory=True)
    _plant(outage_run, kind="artifact", path=str(named), artifact_path="evaluation")
    err = _one_error(capsys, ["sync-tracking", str(outage_run / FALLBACK_FILE), "--tracking_uri", uri])
    assert "lies outside the run folder" in err and "uploads only the run's own files" in err
    assert SECRET_TEXT not in err
    assert not (tmp_path / "store" / "mlruns.db").exists()  # refused before anything was sent
    assert _files_holding(tmp_path, SECRET_TEXT, skip=secret.parent) == []


def test_replay_refuses_an_artifact_path_that_climbs_out_of_the_run(outage_run, tmp_path, capsys) -> None:
    _plant(outage_run, kind="artifact", path=str(outage_run / "report.html"), artifact_path="../../other-run")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    err = _one_error(capsys, ["sync-tracking", str(outage_run / FALLBACK_FILE), "--tracking_uri", uri])
    assert "'artifact_path' is not a relative folder name" in err
    assert not (tmp_path / "mlruns.db").exists()


def test_replay_sends_only_where_the_user_says(outage_run, tmp_path, capsys, monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    planted_db = tmp_path / "planted" / "evil.db"
    fallback = outage_run / FALLBACK_FILE
    lines = [json.loads(line) for line in fallback.read_text().splitlines()]
    lines[0]["tracking_uri"] = f"sqlite:///{planted_db}"  # the header decides nothing
    fallback.write_text("".join(json.dumps(line) + "\n" for line in lines))
    err = _one_error(capsys, ["sync-tracking", str(fallback)])
    assert "pass --tracking_uri or set MLFLOW_TRACKING_URI" in err and "evil.db" in err
    assert not planted_db.parent.exists() and not (outage_run / "mlruns.db").exists()

    chosen = f"sqlite:///{tmp_path / 'chosen.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", chosen)  # the environment names the store: the replay goes there
    assert main(["sync-tracking", str(fallback)]) == 0
    assert "sent 3 calls" in capsys.readouterr().out and not planted_db.parent.exists()
    (run,) = MlflowClient(chosen).search_runs([MlflowClient(chosen).get_experiment_by_name("lora-moe").experiment_id])
    assert run.data.params == {"lr": "0.0001"}
    artifacts = MlflowClient(chosen).list_artifacts(run.info.run_id, "evaluation")
    assert [item.path for item in artifacts] == ["evaluation/report.html"]  # the run's own file is sent


def test_replay_without_a_uri_goes_to_the_run_folders_own_store(outage_run, capsys, monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = f"sqlite:///{(outage_run / 'mlruns.db').resolve()}"  # where a run given no URI logs
    fallback = outage_run / FALLBACK_FILE
    lines = [json.loads(line) for line in fallback.read_text().splitlines()]
    lines[0]["tracking_uri"] = default
    fallback.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["sync-tracking", str(fallback)]) == 0
    assert f"at {default}" in capsys.readouterr().out
    client = MlflowClient(default)
    (run,) = client.search_runs([client.get_experiment_by_name("lora-moe").experiment_id])
    assert run.data.params == {"lr": "0.0001"}


# -- 2. tampered training state (--resume) ------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (link targets as text): what a refused command must leave exactly as it was."""
    return {str(path.relative_to(folder)): (os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_symlink() or path.is_file()}  # fmt: skip


def _run_with_saves(reference: Path, tmp_path: Path, edit=None, up_to: int = 3) -> Path:
    """A run folder holding the reference run's saves of steps 1..``up_to``; ``edit(payload)`` tampers with the
    latest marker (and may return a replacement)."""
    run = tmp_path / "run"
    run.mkdir()
    for path in reference.glob("*_step_*"):
        if int(re.search(r"_step_(\d+)", path.name)[1]) <= up_to:
            shutil.copy(path, run / path.name)
    if edit is not None:
        marker = run / f"training_state_step_{up_to}.json"
        payload = json.loads(marker.read_text())
        edited = edit(payload)
        marker.write_text(edited if isinstance(edited, str) else json.dumps(payload))
    return run


def _drop(key: str):
    return lambda payload: payload.pop(key)


def _set(key: str, value):
    return lambda payload: payload.update({key: value})


TAMPERED = {
    "deeply nested": (lambda payload: "[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
    "missing step": (_drop("step"), "'step' must be an integer"),
    "step as text": (_set("step", "3"), "'step' must be an integer from 0 to"),
    "negative epoch": (_set("epoch", -1), "'epoch' must be an integer from 0 to"),
    "5000-digit step": (
        lambda payload: json.dumps(payload).replace('"step": 3', '"step": ' + "9" * 5000),
        "integer with 5000 digits",
    ),
    "file entry not an object": (
        lambda payload: payload["files"].update({"lora_moe_step_3.safetensors": 7}),
        "'files' entry 'lora_moe_step_3.safetensors' must be",
    ),
    "history of strings": (_set("history", ["loss"]), "'history' must be a list of {metric: number} objects"),
    "early stopping fields": (_set("early_stopping", {"best_roi": 1.0, "patience": 9}), "'early_stopping' does not"),
    "epoch sums of 3 experts": (
        lambda payload: payload["epoch_stats"].update({"gate_sum": [0.0, 0.0, 0.0]}),
        "'epoch_stats' does not have the fields and shapes",
    ),
    "checkpoint not a name": (_set("checkpoint", ["a"]), "'checkpoint' must be a file name"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_marker_is_one_line_and_touches_nothing(case, tiny_cache, stage1, reference, tmp_path, capsys):
    edit, words = TAMPERED[case]
    run = _run_with_saves(reference, tmp_path, edit)
    before = _snapshot(run)
    marker = run / "training_state_step_3.json"
    err = _one_error(capsys, _stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", str(marker)))
    assert words in err and "training_state_step_3.json" in err
    assert _snapshot(run) == before  # nothing written, nothing removed, no tracking file
    # --resume auto skips the unusable save for the whole one before it, as for a damaged one
    assert main(_stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert "skipping training_state_step_3.json: unreadable marker" in printed and _resumed_step(printed) == 2
    _assert_same_run(run, reference)


def test_optimizer_moments_of_another_shape_are_refused(tiny_cache, stage1, reference, tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    from lora_moe_core.training.state import file_digest

    run = _run_with_saves(reference, tmp_path)
    optimizer = run / "optimizer_step_3.safetensors"
    with safe_open_metadata(optimizer) as metadata:
        tensors = load_file(optimizer)
    name = next(key for key in tensors if key.endswith(".exp_avg") and tensors[key].dim() == 2)
    tensors[name] = tensors[name].t().contiguous()  # transposed: the same numbers, the wrong shape
    save_file(tensors, optimizer, metadata)
    marker = run / "training_state_step_3.json"
    payload = json.loads(marker.read_text())
    payload["files"][optimizer.name] = file_digest(optimizer)  # consistent checksums: only the shape is wrong
    marker.write_text(json.dumps(payload))
    before = _snapshot(run)
    err = _one_error(capsys, _stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", str(marker)))
    assert f"optimizer moment '{name}'" in err and "this run's parameter needs" in err
    assert _snapshot(run) == before


@contextlib.contextmanager
def safe_open_metadata(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        yield handle.metadata()


def test_a_marker_that_is_a_fifo_does_not_hang(tiny_cache, stage1, reference, tmp_path, capsys) -> None:
    run = _run_with_saves(reference, tmp_path)
    os.mkfifo(run / "training_state_step_9.json")  # the latest "save" by name
    signal.alarm(120)  # a hang fails the test instead of blocking CI
    try:
        err = _one_error(capsys, _stage2_argv(tiny_cache, stage1, run, *RUN, "--resume",
                                              str(run / "training_state_step_9.json")))  # fmt: skip
        assert "is a named pipe" in err
        assert main(_stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", "auto")) == 0
    finally:
        signal.alarm(0)
    printed = capsys.readouterr().out
    assert "skipping training_state_step_9.json: unreadable marker" in printed and _resumed_step(printed) == 3


@pytest.mark.parametrize("how", ["dot-dot name", "absolute name", "symlink out"])
def test_a_marker_naming_files_outside_its_folder_is_refused(how, tiny_cache, stage1, reference, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(reference / "lora_moe_step_3.safetensors", elsewhere / "lora_moe_step_3.safetensors")
    own = "lora_moe_step_3.safetensors"
    name = {"dot-dot name": f"../elsewhere/{own}", "absolute name": str(elsewhere / own)}.get(how, own)
    run = _run_with_saves(reference, tmp_path, _set("checkpoint", name))
    if how == "symlink out":
        (run / name).unlink()
        (run / name).symlink_to(elsewhere / name)
    before = _snapshot(run)
    for resume in (str(run / "training_state_step_3.json"), "auto"):  # auto refuses too: no skipping past it
        err = _one_error(capsys, _stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", resume))
        assert "'checkpoint'" in err and "a resume reads only files of the run's own folder" in err
        assert _snapshot(run) == before


def test_a_stage1_save_resumed_into_stage2_leaves_no_folder(tiny_cache, stage1, tmp_path, capsys) -> None:
    stage1_run = tmp_path / "stage1_run"
    argv = ["train", "--config", str(DEMO / "vanilla_lora.toml"), "--cache", tiny_cache, "--output_dir",
            str(stage1_run), "--max_train_steps", "1", "--save_every_n_steps", "1"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    out = tmp_path / "new" / "stage2"
    err = _one_error(capsys, _stage2_argv(tiny_cache, stage1, out, *RUN, "--resume",
                                          str(stage1_run / "training_state_step_1.json")))  # fmt: skip
    assert "lora_step_1.safetensors" in err
    assert not (tmp_path / "new").exists()


# -- 3. a credential in a failure path ----------------------------------------------------------------------------
PLANTED_TOKEN = "kfp-tok-9f2c1e0b7a"


def _leaks(text: str) -> bool:
    """Whether any piece of the planted token (as it is, escaped or split by a line break) shows in ``text``."""
    return any(part in text for part in (PLANTED_TOKEN, "9f2c1e0b7a", "X-Injected"))


@pytest.mark.parametrize(("name", "value"), [
    ("KFP_TOKEN", f"{PLANTED_TOKEN}\r\nX-Injected: 1"),
    ("KFP_TOKEN", f"{PLANTED_TOKEN}\n"[:-1] + "\n9f2c1e0b7a"),
    ("KFP_COOKIES", f"authservice_session={PLANTED_TOKEN}\r\nX-Injected: 1"),
    ("KFP_COOKIES", f"authservice_session={PLANTED_TOKEN}\x1b[2J"),
])  # fmt: skip
@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_a_credential_with_a_line_break_is_refused_without_being_shown(name, value, command, tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    for other in ("KFP_TOKEN", "KFP_COOKIES", "KF_PIPELINES_SA_TOKEN_PATH", "KFP_HOST"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    argv = ["pipeline", command, "--host", "http://127.0.0.1:9", "--package", str(tmp_path / "p.yaml")]
    argv += ["--cron", "0 0 3 * * *", "--job_name", "nightly"] if command == "schedule" else []
    capsys.readouterr()
    err = _one_error(capsys, argv)
    assert f"{name} holds a line break or another character a header cannot carry" in err
    out = capsys.readouterr()
    assert not _leaks(err + out.out + out.err)


def test_a_bad_service_account_token_file_is_named_not_shown(tmp_path, capsys, monkeypatch) -> None:
    from pipelines.submit import Connection, probe

    for other in ("KFP_TOKEN", "KFP_COOKIES"):
        monkeypatch.delenv(other, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(f"{PLANTED_TOKEN}\nX-Injected: 1\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    connection = Connection.from_env("http://127.0.0.1:9")
    with pytest.raises(Exception) as caught:
        probe(connection, timeout_s=1)
    assert f"the token file {token_file} holds a line break" in str(caught.value) and not _leaks(str(caught.value))


def test_an_unexpected_failure_prints_its_traceback_without_the_secret(capsys, monkeypatch) -> None:
    """A bug's traceback is still printed (exit 1), with every form of a secret masked: here http.client's own
    refusal of a header, whose message holds the token as a bytes repr (line break escaped)."""
    import http.client

    monkeypatch.setenv("KFP_TOKEN", f"{PLANTED_TOKEN}\nsecond-line-77")

    def crash(args) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", 9)
        connection.putrequest("GET", "/")
        connection.putheader("Authorization", f"Bearer {os.environ['KFP_TOKEN']}")  # raises ValueError
        return 0

    monkeypatch.setattr("lora_moe_core.cli.data._label", crash)  # `label` runs into the bug
    capsys.readouterr()
    assert main(["label", "--dataset", "x", "--output", "y"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: Invalid header value" in err and "***" in err
    assert not _leaks(err) and "second-line-77" not in err


# -- 4. outputs that are, hold or sit among inputs; folders another command owns -----------------------------------
def _model_files(root: Path) -> dict[str, Path]:
    """Stand-ins for a user's model files and folder (never loaded: every check runs before a model loads)."""
    folder = root / "Wan2.2-T2V-A14B-Diffusers"
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae weights")
    files = {"vae": root / "Wan2.1_VAE.pth", "t5": root / "models_t5_umt5-xxl-enc-bf16.pth", "model": folder}
    for name in ("vae", "t5"):
        files[name].write_bytes(f"{name} weights".encode())
    return files


@pytest.mark.parametrize("target", ["the vae file", "the t5 file", "inside the model folder", "a symlink to the vae",
                                    "a hard link to the t5"])  # fmt: skip
def test_infer_never_writes_over_a_model_file(target, tmp_path, capsys) -> None:
    files = _model_files(tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    output = {"the vae file": files["vae"], "the t5 file": files["t5"],
              "inside the model folder": files["model"] / "vae" / "diffusion_pytorch_model.safetensors",
              "a symlink to the vae": tmp_path / "out.mp4",
              "a hard link to the t5": tmp_path / "out.mp4"}[target]  # fmt: skip
    if target == "a symlink to the vae":
        output.symlink_to(files["vae"])
    elif target == "a hard link to the t5":
        os.link(files["t5"], output)
    argv = ["infer", "--task", "tiny", "--prompt", "电凝钩切割组织", "--model", str(files["model"]), "--vae",
            str(files["vae"]), "--t5", str(files["t5"]), "--output_path", str(output)]  # fmt: skip
    err = _one_error(capsys, argv)
    assert "infer: output" in err and ("would overwrite the input" in err or "lies inside the input folder" in err)
    assert {path: path.read_bytes() for path in before} == before
    assert not list(tmp_path.rglob("*.gates.json"))


def test_stage3_refuses_a_run_folder_that_holds_its_input_checkpoint(tiny_cache, reference, tmp_path, capsys):
    run = tmp_path / "stage_b"
    run.mkdir()
    checkpoint = run / "lora_moe_final.safetensors"
    shutil.copy(reference / "lora_moe_final.safetensors", checkpoint)
    before = _snapshot(run)
    argv = ["train", "--config", str(DEMO / "lora_moe_stage_b_merged.toml"), "--cache", tiny_cache,
            "--training_stage", "stage_c", "--lora_moe_weights", str(checkpoint), "--output_dir", str(run),
            "--max_train_steps", "1"]  # fmt: skip
    err = _one_error(capsys, argv)
    assert f"train: output folder {run} holds the input {checkpoint}" in err
    assert _snapshot(run) == before
    argv[argv.index(str(run))] = str(tmp_path / "stage_c")  # its own folder: trains
    assert main(argv) == 0 and _snapshot(run) == before


def test_synth_data_never_replaces_a_users_dataset(tmp_path, capsys) -> None:
    dataset = tmp_path / "surgery"
    (dataset / "videos").mkdir(parents=True)
    (dataset / "videos" / "clip_0000.mp4").write_bytes(b"the user's recording")
    (dataset / "manifest.jsonl").write_text('{"video_path": "videos/clip_0000.mp4", "caption": "电凝钩"}\n')
    before = _snapshot(dataset)
    argv = ["synth-data", "--output", str(dataset), "--num_videos", "2", "--width", "64", "--height", "48",
            "--num_frames", "5"]  # fmt: skip
    err = _one_error(capsys, argv)
    assert "not a folder this command wrote" in err and "pass --overwrite" in err
    assert _snapshot(dataset) == before and before["videos/clip_0000.mp4"] == b"the user's recording"
    own = tmp_path / "synthetic"
    assert main([*argv[:2], str(own), *argv[3:]]) == 0
    assert main([*argv[:2], str(own), *argv[3:]]) == 0  # its own folder: rewritten as before
    assert main([*argv, "--overwrite"]) == 0  # the user said so
    assert (
        "clip_0000.mp4" in _snapshot(dataset / "videos")
        and b"the user's recording" not in _snapshot(dataset / "videos").values()
    )


def test_cache_never_writes_into_its_dataset_or_another_commands_folder(tiny_cache, tmp_path, capsys) -> None:
    from lora_moe_core.data.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, 2, width=64, height=48, num_frames=5)
    before = _snapshot(data)
    base = ["cache", "--task", "tiny", "--target_frames", "5"]
    err = _one_error(capsys, [*base, "--dataset", str(data), "--output", str(data)])
    assert f"cache: output folder {data} holds the input" in err
    err = _one_error(capsys, [*base, "--dataset", str(data / "manifest.jsonl"), "--output", str(data / "videos")])
    assert "holds the input" in err and "clip_0000.mp4" in err
    other = tmp_path / "other"
    generate_dataset(other, 1, width=64, height=48, num_frames=5)
    err = _one_error(capsys, [*base, "--dataset", str(data), "--output", str(other)])
    assert "`lora-moe synth-data`'s output" in err and "pass --overwrite" in err
    assert _snapshot(data) == before
    musubi = tmp_path / "musubi"
    shutil.copytree(tiny_cache, musubi)
    cached = _snapshot(musubi)
    err = _one_error(capsys, ["cache", "--task", "tiny", "--dataset", str(musubi), "--output", str(musubi)])
    assert f"cache: output folder {musubi} holds the input {musubi}" in err
    assert _snapshot(musubi) == cached


def test_train_classifier_never_writes_into_its_cache(tiny_cache, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    before = _snapshot(cache)
    victim = next(name for name in before if name.endswith("_wan.safetensors"))
    err = _one_error(capsys, ["train-classifier", "--cache", str(cache), "--output", str(cache / victim)])
    assert f"train-classifier: output {cache / victim} lies inside the input folder {cache}" in err
    assert _snapshot(cache) == before
