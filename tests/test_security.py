"""Security properties, checked on the real artifacts.

1. Credentials only from the environment, never printed, logged, raised or tracked: ``lora_moe_core.redaction`` on
   its own, through the CLI's one-line errors, the MLflow tracker and its fallback file, and the compiled pipelines
   (no parameter carries a secret, credentials only through ``use_secret_as_env``). The end-to-end grep of a whole
   pipeline run (S3 + MLflow server) is ``test_pipeline_local.py::test_local_run_on_s3_and_mlflow_server``, which
   uses :func:`find_leaks` from here.
2. Nothing unpickles a file: an AST scan of the sources for ``torch.load`` without ``weights_only=True``,
   ``pickle.load`` and friends, ``np.load(allow_pickle=True)``, unsafe YAML loaders.
3. Images: the final stage runs as a numeric non-root uid that owns the folders the app writes.
4. Manifests: every pod template of every overlay meets the restricted Pod Security Standard; MinIO and MLflow are
   reachable only inside the cluster (ClusterIP, no Ingress) and only from their namespace (NetworkPolicy).
"""

from __future__ import annotations

import argparse
import ast
import base64
import logging
import re
import sqlite3
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import yaml

from components.images import IMAGE_UID
from lora_moe_core.cli.main import main as lora_moe
from lora_moe_core.errors import UserError
from lora_moe_core.redaction import MASK, SECRET_ENV_VARS, is_secret_name, redact, redact_mapping, redact_url
from tests.test_deploy_files import DOCKERFILE, MANIFESTS, OVERLAYS, _render, _stages, parse_dockerfile
from tests.test_pipeline import fails_with, load

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("lora_moe_core", "components", "pipelines", "bench")
S3_SECRET = "s3-Secret/Key+7f3a9c2e"  # '/' and '+' as in real AWS keys: they change when percent-encoded
MLFLOW_PASSWORD = "mlflow-pw-51d0c8e4b2"
# the credentials a cluster gives a step (manifests/, components/k8s.py), with values distinctive enough to grep for
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": "lora-moe-key-id",
    "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    "AWS_SESSION_TOKEN": "session-token-0b7e2c91",
    "MLFLOW_TRACKING_USERNAME": "lora-moe",
    "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-9d41e6aa",
    "KFP_TOKEN": "kfp-token-3c5f7a1d",
}


# ---------------------------------------------------------------- finding a secret in what a run leaves behind


def secret_forms(secret: str) -> set[bytes]:
    """How a secret can appear in an output: as is, percent-encoded (URLs), base64 (an HTTP basic-auth header)."""
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    raw = {form.encode() for form in forms}
    return raw | {base64.b64encode(secret.encode())} | {base64.b64encode(f"lora-moe:{secret}".encode())}


def find_leaks(
    secrets: Iterable[str],
    texts: Mapping[str, str] | None = None,
    folders: Iterable[Path] = (),
    s3_prefixes: Iterable[str] = (),
) -> list[str]:
    """``where: secret`` for every place that holds a secret: the given texts (captured output), every file under
    ``folders`` (byte for byte: sqlite stores, logs, artifacts) and every object under the ``s3://`` prefixes."""
    needles = {secret: secret_forms(secret) for secret in secrets}
    blobs: list[tuple[str, bytes]] = [(name, text.encode()) for name, text in (texts or {}).items()]
    blobs += [
        (str(path), path.read_bytes()) for folder in folders for path in Path(folder).rglob("*") if path.is_file()
    ]
    if prefixes := list(s3_prefixes):
        from lora_moe_core.storage.store import Storage

        storage = Storage()
        blobs += [(uri, storage.read_bytes(uri)) for prefix in prefixes for uri in storage.list(prefix)]
    assert blobs, "nothing to search"
    return [
        f"{where}: {secret}"
        for where, blob in blobs
        for secret, forms in needles.items()
        if any(f in blob for f in forms)
    ]


def test_find_leaks_finds_each_form_in_files_sqlite_and_s3(tmp_path, s3_env):
    from lora_moe_core.storage.store import Storage

    (tmp_path / "log.txt").write_text(f"GET http://lora-moe:{urllib.parse.quote(S3_SECRET, safe='')}@host/x\n")
    with sqlite3.connect(tmp_path / "store.db") as db:
        db.execute("CREATE TABLE params (key TEXT, value TEXT)")
        db.execute("INSERT INTO params VALUES ('note', ?)", (f"uses {MLFLOW_PASSWORD}",))
    header = "Authorization: Basic " + base64.b64encode(f"lora-moe:{MLFLOW_PASSWORD}".encode()).decode()
    prefix = "s3://test/find-leaks"
    Storage().write_bytes(f"{prefix}/headers.txt", header.encode())
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "ok.txt").write_text(f"masked: {MASK}")

    found = find_leaks([S3_SECRET, MLFLOW_PASSWORD], {"stdout": "nothing here"}, [tmp_path], [prefix])
    expected = [f"{tmp_path / 'log.txt'}: {S3_SECRET}", f"{tmp_path / 'store.db'}: {MLFLOW_PASSWORD}",
                f"{prefix}/headers.txt: {MLFLOW_PASSWORD}"]  # fmt: skip
    assert sorted(found) == sorted(expected)
    assert find_leaks([S3_SECRET], {"stderr": f"error: {MASK}"}, [clean]) == []


# ---------------------------------------------------------------- redaction


@pytest.fixture
def secret_env(monkeypatch) -> dict[str, str]:
    """The cluster's credential variables set to distinctive values (no other secret variable set)."""
    for name in SECRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    return SECRET_ENV


def test_redact_masks_secret_values_in_every_encoding_and_url_passwords(secret_env):
    text = (f"S3 said {S3_SECRET!r}; url http://lora-moe:{urllib.parse.quote(MLFLOW_PASSWORD)}@mlflow:5000/api and "
            f"s3://b/k?X-Amz-Credential=x&sig={urllib.parse.quote_plus(S3_SECRET)}; db postgresql://u:pa@ss@db:5432/m; "
            "git https://ghp_abcdef@github.com/o/r")  # fmt: skip
    assert redact(text) == (
        f"S3 said '{MASK}'; url http://lora-moe:{MASK}@mlflow:5000/api and s3://b/k?X-Amz-Credential=x&sig={MASK}; "
        f"db postgresql://u:{MASK}@db:5432/m; git https://{MASK}@github.com/o/r"
    )
    # identifiers, ordinary text and URLs without credentials are left alone
    unchanged = "key lora-moe-key-id at http://minio:9000/bucket?owner=a@b.org as lora-moe"
    assert redact(unchanged) == unchanged and redact_url("http://mlflow:5000") == "http://mlflow:5000"
    assert redact("passwords shorter than six characters: abc", {"MLFLOW_TRACKING_PASSWORD": "abc"}).endswith("abc")


def test_redact_mapping_masks_credential_keys_and_nested_values(secret_env):
    params = {"model": {"path": "s3://data/wan", "tokenizer": "umt5"}, "db_password": "hunter2hunter2",
              "sources": [f"http://u:{MLFLOW_PASSWORD}@h/x", 3], "note": f"key {S3_SECRET}", "pad_token": "<pad>",
              "max_tokens": 512, "aws_secret_access_key": ""}  # fmt: skip
    assert redact_mapping(params) == {
        "model": {"path": "s3://data/wan", "tokenizer": "umt5"}, "db_password": MASK,
        "sources": [f"http://u:{MASK}@h/x", 3], "note": f"key {MASK}", "pad_token": "<pad>", "max_tokens": 512,
        "aws_secret_access_key": "",
    }  # fmt: skip
    named = [
        n
        for n in ("AWS_SESSION_TOKEN", "client_secret", "api-key", "kfp.token", "tokenizer", "cache_key")
        if is_secret_name(n)
    ]
    assert named == ["AWS_SESSION_TOKEN", "client_secret", "api-key", "kfp.token"]


def test_user_errors_never_carry_a_secret(secret_env):
    message = str(UserError(f"cannot read http://lora-moe:{MLFLOW_PASSWORD}@mlflow:5000 with\nkey {S3_SECRET}"))
    assert message == f"cannot read http://lora-moe:{MASK}@mlflow:5000 with key {MASK}"


@pytest.mark.parametrize(
    ("where", "words"),
    [("wrong-secret", "access denied"), ("encoded-in-url", "access denied"), ("raw-in-url", "must look like")],
)
def test_s3_failures_print_one_line_without_the_secret(where, words, tmp_path, capsys, monkeypatch, s3_server):
    """A CLI command on s3:// with AWS_SECRET_ACCESS_KEY set to a secret the server refuses, and the same secret in
    the endpoint URL too, percent-encoded, or raw, which makes the URL invalid (its '/' starts the path): one
    ``error:`` line and no secret in any output."""
    server = s3_server.endpoint_url.removeprefix("http://")
    user = s3_server.access_key
    endpoint = {
        "wrong-secret": f"http://{server}",
        "encoded-in-url": f"http://{user}:{urllib.parse.quote(S3_SECRET, safe='')}@{server}",
        "raw-in-url": f"http://{user}:{S3_SECRET}@{server}",
    }[where]
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", user)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    for name in ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    argv = ["label", "--dataset", "s3://test/datasets/x/manifest.jsonl", "--output", str(tmp_path / "labels.jsonl")]
    err = fails_with(capsys, lora_moe, argv, words)
    assert find_leaks([S3_SECRET], {"stderr": err}, [tmp_path]) == [] and "Key" not in err


def test_tracker_masks_params_tags_uri_and_errors_in_warnings_and_fallback(tmp_path, secret_env, monkeypatch, caplog):
    """MLflow down (a closed port) and its URI holding a password: the warning and the fallback file, which hold
    everything the server would have received, carry no secret."""
    import socket

    from lora_moe_core.tracking.mlflow_client import HTTP_ENV_DEFAULTS
    from lora_moe_core.tracking.tracker import FALLBACK_FILE, start_tracker

    for key, value in HTTP_ENV_DEFAULTS.items():  # start_tracker sets these process-wide; restore them after
        monkeypatch.setenv(key, value)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://lora-moe:{MLFLOW_PASSWORD}@127.0.0.1:{port}"
    with (
        caplog.at_level(logging.INFO),
        start_tracker("run", tracking_uri=uri, tags={"source": uri}, output_dir=tmp_path) as tracker,
    ):
        tracker.log_params(
            {"data": {"uri": "s3://data/x", "note": f"key {S3_SECRET}"}, "mlflow_password": "pw12345678"}
        )
        tracker.set_tags({"endpoint": f"http://k:{S3_SECRET}@minio:9000"})
        tracker.log_metrics({"loss": 1.0}, step=1)
    fallback = (tmp_path / FALLBACK_FILE).read_text()
    assert '"data.uri": "s3://data/x"' in fallback and f'"data.note": "key {MASK}"' in fallback
    assert f'"mlflow_password": "{MASK}"' in fallback and f"lora-moe:{MASK}@127.0.0.1" in caplog.text
    assert find_leaks([S3_SECRET, MLFLOW_PASSWORD, "pw12345678"], {"log": caplog.text}, [tmp_path]) == []


def test_tracker_on_a_server_keeps_the_password_out_of_stdout_and_the_store(mlflow_server, secret_env, capsys):
    """MLflow prints "View run <name> at <tracking URI>" when a run ends: with user:password@ in the URI that line
    is suppressed; params and tags reach the server masked."""
    from mlflow import MlflowClient

    from lora_moe_core.tracking.tracker import start_tracker

    uri = mlflow_server.uri.replace("://", f"://lora-moe:{MLFLOW_PASSWORD}@")
    with pytest.MonkeyPatch.context() as env:  # start_tracker sets MLflow's variables process-wide: restore them
        for name in (
            "MLFLOW_HTTP_REQUEST_TIMEOUT",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
        ):
            env.delenv(name, raising=False)
        with start_tracker("secrets", experiment="security", tracking_uri=uri) as tracker:
            tracker.log_params({"endpoint": f"http://k:{S3_SECRET}@minio:9000", "db_password": "pw-0123456789"})
            tracker.set_tags({"note": f"uses {S3_SECRET}"})
    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["endpoint"] == f"http://k:{MASK}@minio:9000"
    assert run.data.params["db_password"] == MASK and run.data.tags["note"] == f"uses {MASK}"
    out = capsys.readouterr()
    assert find_leaks([MLFLOW_PASSWORD, S3_SECRET, "pw-0123456789"], {"out": out.out, "err": out.err}) == []


# ---------------------------------------------------------------- the compiled pipelines


def _segments(name: str) -> set[str]:
    return set(re.split(r"[._\-]", name.lower()))


SECRET_WORDS = {"key", "secret", "password", "passwd", "token", "credential", "credentials", "cookie", "cookies"}


@pytest.fixture(scope="module")
def compiled_with_secrets(tmp_path_factory):
    """Both pipelines compiled (``lora-moe pipeline compile``) in an environment full of credentials."""
    from pipelines.cli import add_pipeline_parser

    with pytest.MonkeyPatch.context() as env:
        for name, value in SECRET_ENV.items():
            env.setenv(name, value)
        env.setenv("MLFLOW_TRACKING_URI", f"http://lora-moe:{MLFLOW_PASSWORD}@mlflow.example.com")
        parser = argparse.ArgumentParser()
        add_pipeline_parser(parser.add_subparsers(dest="command"))
        out = tmp_path_factory.mktemp("compiled")
        args = parser.parse_args(["pipeline", "compile", "--output_dir", str(out)])
        assert args.handler(args) == 0
    return {name: out / f"lora_moe_{name}.yaml" for name in ("training", "inference")}


@pytest.mark.parametrize("pipeline", ["training", "inference"])
def test_compiled_pipeline_holds_no_secret_and_takes_none_as_parameter(pipeline, compiled_with_secrets):
    path = compiled_with_secrets[pipeline]
    secrets = [value for name, value in SECRET_ENV.items() if name != "MLFLOW_TRACKING_USERNAME"]
    assert find_leaks(secrets, folders=[path.parent]) == []
    ir, _, executors = load(path)
    inputs = {"(pipeline)": ir["root"]["inputDefinitions"]["parameters"]}
    inputs |= {name: c.get("inputDefinitions", {}).get("parameters", {}) for name, c in ir["components"].items()}
    for component, parameters in inputs.items():
        for name in parameters:
            assert not _segments(name) & SECRET_WORDS and not is_secret_name(name), f"{component}: parameter {name}"
    credentials = set(SECRET_ENV) | {"MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"}
    for label, executor in ir["deploymentSpec"]["executors"].items():
        plain = {e["name"] for e in executor["container"].get("env", [])}
        assert not plain & credentials, f"{label}: credentials as plain env {plain & credentials}"
        config = executors[label]
        from_secrets = {k.env_var for s in config.secret_as_env for k in s.key_to_env}
        assert from_secrets <= credentials
        context = config.security_context
        assert (context.run_as_user, context.run_as_group, context.run_as_non_root) == (IMAGE_UID, IMAGE_UID, True)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (
            ["--mlflow_tracking_uri", f"http://lora-moe:{MLFLOW_PASSWORD}@mlflow:5000"],
            ["holds credentials", "mlflow-credentials"],
        ),
        (["--s3_endpoint_url", f"http://key:{S3_SECRET}@minio:9000"], ["holds credentials", "(minio:9000)"]),
        (["--s3_endpoint_url", f"key:{S3_SECRET}@minio:9000"], ["holds credentials", "minio-credentials"]),
        (["--run_as_user", "0"], ["non-root"]),
    ],
)
def test_compile_refuses_credentials_in_urls_and_a_root_uid(flags, words, tmp_path, capsys):
    err = fails_with(capsys, lora_moe, ["pipeline", "compile", "--output_dir", str(tmp_path), *flags], *words)
    assert find_leaks([MLFLOW_PASSWORD, S3_SECRET], {"stderr": err}) == [] and not list(tmp_path.iterdir())


def test_submit_refuses_credentials_in_the_kfp_host(capsys, monkeypatch):
    monkeypatch.delenv("KFP_HOST", raising=False)
    argv = ["pipeline", "submit", "--host", f"http://admin:{MLFLOW_PASSWORD}@kfp.example.com", "--package", "x.yaml"]
    err = fails_with(capsys, lora_moe, argv, "holds credentials", "KFP_TOKEN", "(kfp.example.com)")
    assert MLFLOW_PASSWORD not in err and "admin" not in err


def test_local_run_summary_masks_the_tracking_password():
    from pipelines.local_run import LocalResult

    result = LocalResult(1.0, {}, f"https://lora-moe:{MLFLOW_PASSWORD}@mlflow.example.com", None)
    assert f"https://lora-moe:{MASK}@mlflow.example.com (experiment lora-moe)" in "\n".join(result.summary())


# ---------------------------------------------------------------- nothing unpickles a file


_UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load", "dill.loads",
    "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open",
    "pandas.read_pickle", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load", "numpy.lib.format.read_array",
}  # fmt: skip
_SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader"}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: call`` for every call that can unpickle (run code from) the file it reads."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name: a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or (name := _dotted(node.func, aliases)) is None:
            continue
        name = name.replace("np.", "numpy.", 1) if name.startswith("np.") else name
        keywords = {k.arg: k.value for k in node.keywords}

        def constant(key: str, keywords=keywords):
            value = keywords.get(key)
            return value.value if isinstance(value, ast.Constant) else ("<expr>" if value is not None else None)

        unsafe = (
            name in _UNSAFE_CALLS
            or (name in ("torch.load", "torch.serialization.load") and constant("weights_only") is not True)
            or (name == "numpy.load" and constant("allow_pickle") not in (None, False))
            or (
                name == "yaml.load"
                and _dotted(keywords.get("Loader", ast.Constant(None)), aliases) not in _SAFE_YAML_LOADERS
            )
        )
        if unsafe:
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_the_unpickling_scan_finds_every_unsafe_form():
    bad = """
import pickle, torch, yaml, joblib
import numpy as np
from pickle import loads as l
from torch import load
pickle.load(open("f", "rb"))
l(b"")
torch.load("f.pt")
torch.load("f.pt", weights_only=False)
load("f.pt", map_location="cpu")
np.load("f.npy", allow_pickle=True)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
joblib.load("f.joblib")
"""
    assert [line.split(": ")[1] for line in unsafe_loads(bad)] == [
        "pickle.load", "pickle.loads", "torch.load", "torch.load", "torch.load", "numpy.load", "yaml.load",
        "yaml.unsafe_load", "joblib.load",
    ]  # fmt: skip
    safe = """
import pickle, torch, yaml
import numpy as np
torch.load("f.pt", weights_only=True, map_location="cpu")
np.load("f.npy")
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
pickle.dumps({})
"""
    assert unsafe_loads(safe) == []


def test_no_source_unpickles_a_file():
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30
    found = [
        hit for path in files for hit in unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert found == [], "\n".join(found)


# ---------------------------------------------------------------- images


def test_image_runs_as_a_numeric_non_root_uid_that_owns_what_it_writes():
    final = _stages(parse_dockerfile(DOCKERFILE))[-1]
    user = [rest for keyword, rest in final if keyword == "USER"][-1]
    assert re.fullmatch(r"\d+:\d+", user), f"USER {user}: numeric uid:gid, or the kubelet cannot check runAsNonRoot"
    uid, gid = (int(part) for part in user.split(":"))
    assert uid == gid == IMAGE_UID != 0
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert f"useradd --uid {uid} --gid {gid}" in runs
    owned = {path for match in re.finditer(rf"chown -R {uid}:0 ([^&]+)", runs) for path in match.group(1).split()}
    writable = {path for match in re.finditer(r"chmod -R g=u ([^&]+)", runs) for path in match.group(1).split()}
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for keyword, rest in final if keyword == "ENV")))
    for name in ("HOME", "HF_HOME", "LORA_MOE_CACHE", "MPLCONFIGDIR"):
        folder = env[name]
        assert folder.startswith("/tmp/") or any(folder == p or folder.startswith(p + "/") for p in owned & writable), (
            f"{name}={folder} is not owned by uid {uid}"
        )


# ---------------------------------------------------------------- manifests: restricted pods, internal services


_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}  # fmt: skip


def restricted_violations(pod: dict) -> list[str]:
    """What in a pod spec breaks the restricted Pod Security Standard (baseline included), checked as the
    admission controller does: container fields fall back to the pod's."""
    bad = [field for field in ("hostNetwork", "hostPID", "hostIPC") if pod.get(field)]
    pod_sc = pod.get("securityContext") or {}
    if pod_sc.get("seccompProfile", {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        bad.append("pod seccompProfile")
    if pod_sc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    if pod_sc.get("sysctls") or pod_sc.get("windowsOptions", {}).get("hostProcess"):
        bad.append("pod sysctls/hostProcess")
    if {"user", "role"} & set(pod_sc.get("seLinuxOptions", {})):
        bad.append("pod seLinuxOptions")
    bad += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= _RESTRICTED_VOLUMES]
    for container in pod.get("initContainers", []) + pod.get("containers", []) + pod.get("ephemeralContainers", []):
        sc, name = container.get("securityContext") or {}, container["name"]
        caps = sc.get("capabilities") or {}
        checks = {
            "privileged": not sc.get("privileged"),
            "allowPrivilegeEscalation": sc.get("allowPrivilegeEscalation") is False,
            "runAsNonRoot": sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True,
            "runAsUser": sc.get("runAsUser", pod_sc.get("runAsUser")) != 0,
            "seccompProfile": (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            in ("RuntimeDefault", "Localhost"),
            "capabilities.drop": "ALL" in (caps.get("drop") or []),
            "capabilities.add": set(caps.get("add") or []) <= {"NET_BIND_SERVICE"},
            "hostPort": not any(port.get("hostPort") for port in container.get("ports", [])),
            "procMount": sc.get("procMount", "Default") == "Default",
            "appArmorProfile": sc.get("appArmorProfile", {}).get("type") != "Unconfined",
        }
        bad += [f"{name}: {check}" for check, ok in checks.items() if not ok]
    return bad


def test_the_restricted_check_finds_each_violation():
    good_sc = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": good_sc}],
            "volumes": [{"name": "t", "emptyDir": {}}]}  # fmt: skip
    assert restricted_violations(good) == []
    bad = {
        "hostNetwork": True,
        "securityContext": {"runAsUser": 0},
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        "initContainers": [{"name": "i", "securityContext": {**good_sc, "runAsNonRoot": True, "privileged": True}}],
        "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}],
                        "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}],
    }  # fmt: skip
    assert restricted_violations(bad) == [
        "hostNetwork", "pod runAsUser 0", "volume host", "i: privileged", "i: runAsUser", "i: seccompProfile",
        "c: allowPrivilegeEscalation", "c: runAsNonRoot", "c: runAsUser", "c: seccompProfile", "c: capabilities.drop",
        "c: capabilities.add", "c: hostPort",
    ]  # fmt: skip


def _pod_templates(objects) -> dict[str, dict]:
    pods = {}
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Pod":
            pods[where] = obj["spec"]
        elif obj["kind"] == "CronJob":
            pods[where] = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif obj["kind"] == "PyTorchJob":
            pods |= {f"{where}/{r}": s["template"]["spec"] for r, s in obj["spec"]["pytorchReplicaSpecs"].items()}
        elif "template" in obj.get("spec", {}):
            pods[where] = obj["spec"]["template"]["spec"]
    return pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay):
    pods = _pod_templates(_render(overlay))
    assert set(pods) == {"StatefulSet/minio", "Job/minio-buckets", "Deployment/mlflow"}
    for where, pod in pods.items():
        assert restricted_violations(pod) == [], f"{overlay}:{where}"
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID and pod["automountServiceAccountToken"] is False


def test_optional_pytorchjob_is_restricted_and_runs_as_the_image_uid():
    docs = yaml.safe_load_all((MANIFESTS / "optional" / "pytorchjob-stage2.yaml").read_text(encoding="utf-8"))
    pods = _pod_templates([d for d in docs if d])
    assert set(pods) == {"PyTorchJob/lora-moe-stage2/Master", "PyTorchJob/lora-moe-stage2/Worker"}
    for where, pod in pods.items():
        assert restricted_violations(pod) == [], where
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (IMAGE_UID, IMAGE_UID)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minio_and_mlflow_are_reachable_only_from_their_namespace(overlay):
    objects = _render(overlay)
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Ingress", "Route", "Gateway", "HTTPRoute", "Namespace"}, kinds  # no Namespace: KFP's own
    for service in (o for o in objects if o["kind"] == "Service"):
        spec = service["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert not spec.get("externalIPs") and not any("nodePort" in p for p in spec["ports"])
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for workload in (o for o in objects if o["metadata"]["name"] in ("minio", "mlflow") and "template" in o["spec"]):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert selecting, f"no NetworkPolicy selects {workload['metadata']['name']}"
        container_ports = {p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"]
                           for p in c["ports"]}  # fmt: skip
        for policy in selecting:
            assert "Ingress" in policy["spec"]["policyTypes"]
            for rule in policy["spec"]["ingress"]:
                assert rule["from"] == [{"podSelector": {}}], f"{policy['metadata']['name']}: {rule}"
                assert {p["port"] for p in rule["ports"]} <= container_ports
        assert {p["port"] for pol in selecting for r in pol["spec"]["ingress"] for p in r["ports"]} == container_ports
