"""Bad input, round three (issue #26 classes 4-11, issue #23 item 5): endpoints and URIs, pipeline parameters,
allocation bombs in configs, hostile config keys, diffusers folders, output places, duplicate videos and
failed commands that left folders. Cases run through the sandbox of ``test_bad_inputs.py`` (exit 2, one
``error:`` line naming file and reason, nothing written or lost); every hostile input is made at test time.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import pytest
import torch

from lora_moe_core.errors import MAX_WORD_CHARS, UserError, one_line
from tests.test_bad_inputs import CAPTION, Argv, Case, _cache_argv, _manifest, check_case, mixed_run  # noqa: F401
from tests.test_bad_inputs_round2 import _cache, _checkpoint


def _write(name: str, text: str):
    def prepare(src: Path) -> None:
        (src / name).write_text(text, encoding="utf-8")

    return prepare


def _config(case_id: str, text: str, *words: str) -> Case:
    """``train`` of a config ``bad.toml`` holding ``text``: refused while the config is read, before any build."""
    argv: Argv = lambda src, out: ["train", "--task", "tiny", "--config", str(src / "bad.toml"), "--output_dir",
                                   str(out)]  # fmt: skip
    return Case(case_id, argv, ("bad.toml", *words), "lora_moe_final.safetensors", _write("bad.toml", text))


def _train_flags(case_id: str, *flags: str, words: tuple[str, ...]) -> Case:
    argv: Argv = lambda src, out: ["train", "--task", "tiny", *flags, "--output_dir", str(out)]
    return Case(case_id, argv, words, "lora_moe_final.safetensors")


def _duplicate(case_id: str, command: str, second: str, changes: dict, *words: str) -> Case:
    """``label``/``cache`` of a manifest listing ``ok.mp4`` and then ``second`` (the same video: another spelling
    or a byte copy) with ``changes``: which entry is meant cannot be told, so both lines are named."""

    def prepare(src: Path) -> None:
        shutil.copy(src / "ok.mp4", src / "copy.mp4")
        first = {"video_path": "ok.mp4", "caption": CAPTION}
        _manifest(src, "twice.jsonl", first, {**first, "video_path": second, **changes})

    if command == "label":
        argv: Argv = lambda src, out: ["label", "--dataset", str(src / "twice.jsonl"), "--output",
                                       str(out / "labels.jsonl")]  # fmt: skip
    else:
        argv = lambda src, out: _cache_argv(str(src / "twice.jsonl"), str(out / "cache"))
    output = "labels.jsonl" if command == "label" else "cache"
    return Case(case_id, argv, ("twice.jsonl:1 and ", "twice.jsonl:2 list the same video", *words), output, prepare)


def _run(case_id: str, params, *words: str, prepare=None, pipeline: str = "training") -> Case:
    """``pipeline run --output_dir <a folder holding an earlier file> --param ...``: nothing may be added to it."""
    argv: Argv = lambda src, out: ["pipeline", "run", "--pipeline", pipeline, "--output_dir", str(out),
                                   *(f"--param={param}" for param in params(src))]  # fmt: skip
    return Case(case_id, argv, words, "earlier.txt", prepare)


RANK = "at most 1,024 (WAN2.2 A14B adapters use ranks 4-128"
DOTTED = "a" + ".a" * 99_999  # 100,000 parts: tomllib needs minutes for it

# fmt: off
CASES = [
    # 6. allocation bombs: bounded while the config is validated, before a tensor is allocated
    _config("config-lora-dim-1e8", "[lora]\nlora_dim = 1e8\n", "lora.lora_dim", RANK),
    _config("config-router-hidden-1e10", "[router]\nrouter_hidden_dim = 1e10\n", "router.router_hidden_dim",
            "at most 4,096"),
    _config("config-expert-dim-huge", "[lora_moe]\nlora_dim = 100000\n", "lora_moe.lora_dim", RANK),
    _config("config-block-selector-5000-digits", f'[lora]\ntarget_blocks = "last_{"9" * 5000}"\n',
            "lora.target_blocks", "(5,007 characters)"),
    _config("config-block-index-huge", "[lora]\nffn_target_blocks = [1, 100000000]\n", "lora.ffn_target_blocks",
            "from 0 to 9999"),
    _config("config-1000-timestep-buckets",
            "[gates]\ntimestep_boundaries = [" + ", ".join(f"{0.5 + i * 0.9:.2f}" for i in range(1000)) + "]\n",
            "gates.timestep_boundaries", "at most 99 edges"),
    _train_flags("flag-rank-ffn-huge", "--rank_ffn", "100000", words=("lora.rank_ffn", RANK)),
    # 7. config keys: no hang, no terminal sequence echoed
    _config("config-dotted-key-100000-parts", f"[training]\n{DOTTED} = 1\n", "dotted TOML key of 100,000 parts",
            "at most 64"),
    _config("config-dotted-table-100000-parts", f"[{DOTTED}]\nx = 1\n", "dotted TOML key of 100,000 parts"),
    _config("config-ansi-in-unknown-key", '[training]\n"x\\u001b[31mred\\u001b[0m" = 1\n',
            "unknown config key 'training.x\\x1b[31mred\\x1b[0m'"),
    _config("config-bidi-in-unknown-key", '[training]\n"rate\\u202eetar" = 1\n', "'training.rate\\u202eetar'"),
    # 5. pipeline parameters: bounded like every JSON we read; cron digits are ASCII
    Case("run-param-deep-json", lambda src, out: ["pipeline", "run", "--output_dir", str(out / "run"), "--param",
         "clips=" + "[" * 100_000], ("--param clips", "nested deeper than 64"), "unused.txt"),
    Case("run-param-5000-digits", lambda src, out: ["pipeline", "run", "--output_dir", str(out / "run"), "--param",
         "clips=" + "9" * 5000], ("--param clips", "5000 digits"), "unused.txt"),
    Case("submit-param-deep-json", lambda src, out: ["pipeline", "submit", "--host", "http://127.0.0.1:9",
         "--param", "x=" + "{\"a\":" * 1000], ("--param x", "nested deeper"), "unused.txt"),
    Case("schedule-cron-superscript", lambda src, out: ["pipeline", "schedule", "--cron", "0 0 \u00b3 * * *",
         "--job_name", "nightly"], ("bad hour field", "\u00b3"), "unused.txt"),
    Case("schedule-cron-arabic-digit", lambda src, out: ["pipeline", "schedule", "--cron", "0 0 3 * * */\u0662",
         "--job_name", "nightly"], ("bad day of week field",), "unused.txt"),
    _config("config-cr-in-section-name", '["train\\ring"]\nx = 1\n', "unknown config key 'train ing'"),
    # 10. one video listed twice with another caption (or other tip boxes): ambiguous, refused naming both entries
    _duplicate("label-same-video-two-captions", "label", "ok.mp4", {"caption": "剪刀剪开组织"}, "different captions"),
    _duplicate("cache-same-video-two-captions", "cache", "./ok.mp4", {"caption": "剪刀剪开组织"}, "different captions"),
    _duplicate("cache-copy-two-captions", "cache", "copy.mp4", {"caption": "吸引器吸除积液"}, "different captions",
               "copy.mp4 holds the same bytes as"),
    _duplicate("label-same-video-other-roi", "label", "ok.mp4", {"roi": [[0, 0, 8, 8]]}, "different 'roi'"),
    # 11. `pipeline run` with a model file, checkpoint or dataset that is not there: refused before any step runs,
    # no run folder, store or arguments.json left behind (the output folder below holds only an earlier file)
    _run("run-missing-vae", lambda src: ["vae_uri=" + str(src / "wan_2.1_vae.safetensors")],
         "--param vae_uri", "wan_2.1_vae.safetensors: no such weights file"),
    _run("run-missing-t5", lambda src: ["t5_uri=" + str(src / "models_t5_umt5-xxl-enc-bf16.pth")],
         "--param t5_uri", "no such weights file"),
    _run("run-vae-uri-a-number", lambda src: ["vae_uri=5"], "--param vae_uri must be a path or an s3:// URI, got 5"),
    _run("run-vae-is-a-folder", lambda src: ["vae_uri=" + str(src / "caption_dir")], "--param vae_uri",
         "is a directory, not a file"),
    _run("run-t5-pth-named-safetensors", lambda src: ["t5_uri=" + str(src / "t5.safetensors")], "--param t5_uri",
         "t5.safetensors is a PyTorch checkpoint", "under a .safetensors name",
         prepare=lambda src: torch.save({"token_embedding.weight": torch.zeros(4, 2)}, src / "t5.safetensors")),
    _run("run-vae-holds-a-lora", lambda src: ["vae_uri=" + str(src / "lora_nan.safetensors")], "--param vae_uri",
         "not a Wan VAE"),
    _run("run-missing-base-model", lambda src: ["base_model_uri=" + str(src / "Wan2.2-T2V-A14B-Diffusers")],
         "--param base_model_uri", "no such folder"),
    _run("run-base-model-not-diffusers", lambda src: ["base_model_uri=" + str(src / "caption_dir")],
         "--param base_model_uri", "not a diffusers-layout Wan2.2 folder"),
    _run("run-a14b-without-a-model", lambda src: ["task=t2v-A14B"], "--param task t2v-A14B needs base_model_uri"),
    _run("run-missing-stage1-lora", lambda src: ["stage1_lora_uri=" + str(src / "stage1.safetensors")],
         "--param stage1_lora_uri", "no such Stage-1 LoRA"),
    _run("run-missing-dataset", lambda src: ["synthetic_clips=0", "dataset_uri=" + str(src / "train")],
         "--param dataset_uri", "no such dataset"),
    _run("run-inference-missing-checkpoint", lambda src: ["lora_moe_uri=" + str(src / "lora_moe.safetensors")],
         "--param lora_moe_uri", "no such LoRA-MoE checkpoint", pipeline="inference"),
]
# fmt: on


S3_KEYS = {"AWS_ACCESS_KEY_ID": "lora-moe", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}
NO_KFP = {"KFP_HOST": "", "KF_PIPELINES_ENDPOINT": "", "KFP_TOKEN": "", "KFP_COOKIES": ""}


def _s3_label(case_id: str, endpoint: str, *words: str) -> tuple[Case, dict[str, str]]:
    argv: Argv = lambda src, out: ["label", "--dataset", "s3://lora-moe-data/videos", "--output",
                                   str(out / "labels.jsonl")]  # fmt: skip
    return Case(case_id, argv, ("S3_ENDPOINT_URL", *words), "labels.jsonl"), {"S3_ENDPOINT_URL": endpoint, **S3_KEYS}


def _submit(case_id: str, host: str | None, *words: str, env_host: str = "") -> tuple[Case, dict[str, str]]:
    argv: Argv = lambda src, out: ["pipeline", "submit", *(["--host", host] if host else [])]
    return Case(case_id, argv, ("KFP host", *words), "unused.txt"), {**NO_KFP, "KFP_HOST": env_host}


def _tracked(case_id: str, uri: str, *words: str, command: str = "register") -> tuple[Case, dict[str, str]]:
    """``register`` (or ``train``) with ``MLFLOW_TRACKING_URI`` set to ``uri``: refused before a run starts."""
    if command == "register":
        argv: Argv = lambda src, out: ["register", "--lora_moe_weights", str(src / "Hook.safetensors"), "--work_dir",
                                       str(out / "work")]  # fmt: skip
        prepare = lambda src: _checkpoint(src / "Hook.safetensors")  # noqa: E731
    else:
        argv = lambda src, out: ["train", "--task", "tiny", "--cache", str(src / "cache"), "--output_dir", str(out)]
        prepare = _cache()
    case = Case(case_id, argv, ("MLFLOW_TRACKING_URI", *words), "unused.txt", prepare)
    return case, {"MLFLOW_TRACKING_URI": uri}


UNCLOSED = "unclosed '[' of an IPv6 address"
PORT = "port out of range (1-65535)"

# fmt: off
ENV_CASES = [
    # 4. endpoints and URIs: one line before anything connects (no retries, no urllib traceback)
    _s3_label("s3-endpoint-unclosed-ipv6", "http://[::1", UNCLOSED),
    _s3_label("s3-endpoint-port-99999", "http://minio:99999", PORT),
    _s3_label("s3-endpoint-port-not-a-number", "http://minio:9x00", "not a number"),
    _s3_label("s3-endpoint-space", "http://mi nio:9000", "holds a space at character 9"),
    _s3_label("s3-endpoint-ansi", "http://minio\x1b[2J:9000", "U+001B"),
    _tracked("mlflow-unknown-scheme", "foo://bar", "unknown scheme 'foo'"),
    _tracked("mlflow-unknown-scheme-train", "mlfow://typo:5000", "unknown scheme 'mlfow'", command="train"),
    _tracked("mlflow-port-out-of-range", "http://mlflow:70000", PORT),
    _tracked("mlflow-unclosed-ipv6", "http://[fe80::1", UNCLOSED),
    _submit("kfp-host-path-space", "http://localhost:8080/pipe line", "holds a space at character 26"),
    _submit("kfp-host-name-space", "http://local host:8080", "holds a space"),
    _submit("kfp-host-port-99999", "http://localhost:99999", PORT),
    _submit("kfp-host-env-unclosed-ipv6", None, UNCLOSED, "'http://[::1'", env_host="http://[::1"),
]
# fmt: on


@pytest.mark.parametrize(("case", "env"), ENV_CASES, ids=[case.id for case, _ in ENV_CASES])
def test_bad_environment_round_three(case, env, tmp_path, monkeypatch, capsys, caplog, request, mixed_run):  # noqa: F811
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    check_case(case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run)


def test_pipeline_settings_refuse_bad_endpoints(capsys, tmp_path):
    from tests.helpers import assert_one_line_error

    bad = (("--s3_endpoint_url", "http://[::1", ("S3 endpoint", UNCLOSED)),
           ("--mlflow_tracking_uri", "http://mlflow:5000000", ("MLflow tracking URI", PORT)))  # fmt: skip
    for flag, url, words in bad:
        assert_one_line_error(capsys, ["pipeline", "compile", flag, url, "--output_dir", str(tmp_path / "y")], *words)
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_round_three(case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run):  # noqa: F811
    started = time.monotonic()
    check_case(case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run)
    assert time.monotonic() - started < 30  # a 100,000-part key took minutes in tomllib


def test_user_error_messages_are_one_safe_line():
    """Whatever a message quotes, it prints as one line with no raw control, bidi or format character."""
    message = str(UserError("key 'a\x1b[31mb\rc\u202ed\u200be\x00' is\nunknown"))
    assert message == "key 'a\\x1b[31mb c\\u202ed\\u200be\\x00' is unknown"
    assert message.isprintable()
    long_key = "k" * 100_000
    shown = str(UserError(f"unknown config key '{long_key}'; did you mean 'lora_dim'?"))
    assert len(shown) < 2 * MAX_WORD_CHARS and "(100,003 characters)" in shown and shown.endswith("'lora_dim'?")
    assert one_line("电凝钩 is fine") == "电凝钩 is fine"
    assert len(one_line("word " * 10_000)) < 4100


def test_unknown_flag_is_echoed_escaped(capsys):
    from lora_moe_core.cli.main import main

    with pytest.raises(SystemExit) as exit_info:  # argparse's usage errors leave through SystemExit
        main(["train", "--task", "tiny", "--x\x1b[2J\u202e"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "unrecognized arguments: --x\\x1b[2J\\u202e" in err and "\x1b" not in err


# -- 9. output places: a file where a folder should be, a read-only folder, a full disk ---------------------------
def _into_file(case_id: str, make_argv, *words: str, prepare=None) -> Case:
    """A command whose output folder is ``out/earlier.txt``, a regular file an earlier run left (kept intact)."""
    argv: Argv = lambda src, out: make_argv(src, out / "earlier.txt")
    return Case(case_id, argv, ("earlier.txt", *words), "earlier.txt", prepare)


FILE = "it is a file, not a folder"
PARENT_FILE = "earlier.txt is a file, not a folder"

# fmt: off
OUTPUT_CASES = [
    _into_file("train-output-dir-is-a-file", lambda src, o: ["train", "--task", "tiny", "--cache", str(src / "cache"),
               "--no-use_base_lora", "--output_dir", str(o)], "output_dir", FILE, prepare=_cache()),
    _into_file("cache-output-is-a-file", lambda src, o: ["cache", "--dataset", str(src / "ok.jsonl"), "--task", "tiny",
               "--output", str(o)], "cache folder", FILE),
    _into_file("cache-output-under-a-file", lambda src, o: ["cache", "--dataset", str(src / "ok.jsonl"), "--task",
               "tiny", "--output", str(o / "cache")], PARENT_FILE),
    _into_file("evaluate-output-under-a-file", lambda src, o: ["evaluate", "--task", "tiny", "--lora_moe_weights",
               str(src / "Hook.safetensors"), "--cache", str(src / "cache"), "--output_dir", str(o / "eval"),
               "--samples_per_family", "0"], PARENT_FILE,
               prepare=lambda src: (_cache()(src), _checkpoint(src / "Hook.safetensors"))),
    _into_file("export-output-dir-is-a-file", lambda src, o: ["export", "--lora_moe_weights",
               str(src / "Hook.safetensors"), "--instrument_hint", "Hook", "--output_dir", str(o)], "cannot create",
               FILE, prepare=lambda src: _checkpoint(src / "Hook.safetensors")),
    _into_file("label-output-under-a-file", lambda src, o: ["label", "--dataset", str(src / "ok.jsonl"), "--output",
               str(o / "labels.jsonl")], "labels.jsonl", FILE),
    _into_file("infer-output-under-a-file", lambda src, o: ["infer", "--task", "tiny", "--prompt", "hook",
               "--output_path", str(o / "video.mp4")], "video.mp4", FILE),
    _into_file("demo-output-dir-is-a-file", lambda src, o: ["demo", "--output_dir", str(o)], "output_dir", FILE),
]
# fmt: on


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[case.id for case in OUTPUT_CASES])
def test_output_place_round_three(case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run):  # noqa: F811
    check_case(case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run)


@pytest.fixture
def read_only(tmp_path):
    """An immutable folder (``chattr +i``): not even root creates a file in it, as on a read-only mount."""
    import shutil
    import subprocess

    folder = tmp_path / "read_only"
    folder.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("no chattr +i on this file system")
    yield folder
    subprocess.run([chattr, "-i", str(folder)], check=True)


def test_read_only_output_folder_is_one_line_and_nothing_written(read_only, capsys, monkeypatch):
    from tests.helpers import assert_one_line_error
    from tests.test_bad_inputs import BAD

    src = read_only.parent / "src"
    src.mkdir()
    _cache()(src)
    _checkpoint(src / "Hook.safetensors")
    monkeypatch.chdir(read_only.parent)
    denied = "Operation not permitted"
    commands = [
        ["train", "--task", "tiny", "--cache", str(src / "cache"), "--no-use_base_lora", "--output_dir",
         str(read_only / "run")],
        ["cache", "--dataset", str(BAD / "ok.jsonl"), "--task", "tiny", "--output", str(read_only)],
        ["label", "--dataset", str(BAD / "ok.jsonl"), "--output", str(read_only / "labels.jsonl")],
        ["export", "--lora_moe_weights", str(src / "Hook.safetensors"), "--instrument_hint", "Hook", "--output_dir",
         str(read_only)],
        ["evaluate", "--task", "tiny", "--lora_moe_weights", str(src / "Hook.safetensors"), "--cache",
         str(src / "cache"), "--output_dir", str(read_only / "eval"), "--samples_per_family", "0"],
        ["infer", "--task", "tiny", "--prompt", "hook", "--output_path", str(read_only / "video.mp4")],
        ["pipeline", "compile", "--output_dir", str(read_only / "yaml")],
    ]  # fmt: skip
    for argv in commands:
        assert_one_line_error(capsys, argv, str(read_only.name), denied)
    assert list(read_only.iterdir()) == []


@pytest.fixture
def small_disk():
    """For this process, while used: a write past ``limit`` bytes of a file fails with EFBIG, as on a full disk
    (RLIMIT_FSIZE: no mount, no privilege; SIGXFSZ, which would kill the process, is ignored meanwhile)."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    @contextlib.contextmanager
    def limited(limit: int = 2000):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    yield limited
    signal.signal(signal.SIGXFSZ, previous)


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, small_disk, capsys, monkeypatch):
    from tests.helpers import assert_one_line_error
    from tests.test_bad_inputs import BAD

    _checkpoint(tmp_path / "Hook.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(tmp_path)
    commands = [
        ["export", "--lora_moe_weights", str(tmp_path / "Hook.safetensors"), "--instrument_hint", "Hook",
         "--output_dir", str(out / "export")],
        ["label", "--dataset", str(BAD / "ok.jsonl"), "--output", str(out / "labels" / "labels.jsonl")],
        ["infer", "--task", "tiny", "--prompt", "hook", "--output_path", str(out / "video" / "v.mp4"),
         "--num_inference_steps", "1", "--num_frames", "5", "--height", "32", "--width", "32"],
        ["pipeline", "compile", "--output_dir", str(out / "yaml")],
        ["register", "--lora_moe_weights", str(tmp_path / "Hook.safetensors"), "--work_dir", str(out / "work")],
    ]  # fmt: skip
    for argv in commands:
        with small_disk(100 if argv[0] == "label" else 2000):  # the labels of ok.jsonl are ~300 bytes
            assert_one_line_error(capsys, argv, "file too large")
        assert list(out.iterdir()) == [], argv  # no folder, no temp file, no half-written YAML
