"""The TrainJob launcher's create / wait / timeout / failure / TTL paths, through the real ``kubernetes`` client,
against tests/k8s_api.py: a local server speaking the Kubernetes API (no kube-apiserver installs here)."""

from __future__ import annotations

import pytest

from components.k8s import ClusterSettings, trainjob_placement
from lora_moe_core.errors import UserError
from lora_moe_core.training.trainjob import Placement, TrainJobRequest, build_trainjob
from lora_moe_core.training.trainjob_client import DELETE_AFTER, TrainJobFailed, TrainJobRunner, WaitSettings, kube_api
from tests.k8s_api import Cluster, KubernetesAPI, pod

NS, NAME = "kubeflow", "lora-moe-s2-0123456789ab"
NOW = 1_800_000_000.0  # the launcher's clock in these tests (Unix seconds)


def _body(name: str = NAME) -> dict:
    placement = Placement.from_dict(trainjob_placement(ClusterSettings()))
    request = TrainJobRequest(name=name, namespace=NS, num_nodes=2, gpus_per_node=1,
                              command=("lora-moe", "train-node"), placement=placement)  # fmt: skip
    return build_trainjob(request)


def _condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


class Script:
    """The cluster's controllers, one step per read of the TrainJob: each step sets its status (None: no
    status yet); the last step stays. It acts on a TrainJob the launcher created, not on one a test put in the
    cluster as an earlier attempt's. ``on_start`` runs once the TrainJob exists (make its pods, say)."""

    def __init__(self, steps: list[dict | None], on_start=None):
        self.steps, self.on_start, self.reads = steps, on_start, 0

    def __call__(self, cluster: Cluster) -> None:
        job = cluster.trainjobs.get((NS, NAME))
        if job is None or "resourceVersion" not in job["metadata"]:  # none yet, or one a test put there itself
            return
        if self.reads == 0 and self.on_start:
            self.on_start(cluster)
        step = self.steps[min(self.reads, len(self.steps) - 1)]
        self.reads += 1
        if step is not None:
            job["status"] = step


def _pods(phases: tuple[str, str], lines: int = 150):
    """What Trainer's JobSet would make: one pod per node, each with a log of ``lines`` lines."""

    def make(cluster: Cluster) -> None:
        for index, phase in enumerate(phases):
            node = pod(NS, NAME, index, phase)
            cluster.pods[(NS, node["metadata"]["name"])] = node
            cluster.logs[(NS, node["metadata"]["name"])] = "".join(f"node {index} line {n}\n" for n in range(lines))

    return make


RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0}]}


def _runner(api: KubernetesAPI, log: list[str], **settings) -> TrainJobRunner:
    wait = WaitSettings(**{"timeout_s": 30, "poll_s": 0.01, "ttl_s": 3600, "log_lines": 5, **settings})
    return TrainJobRunner(kube_api(api.url), wait, log.append, clock=lambda: NOW)


def test_a_completed_trainjob_is_followed_logged_and_kept_for_its_ttl():
    log: list[str] = []
    with KubernetesAPI() as api:
        api.cluster.controller = Script([None, RUNNING, RUNNING, {**RUNNING, "conditions": [_condition("Complete")]}],
                                        on_start=_pods(("Running", "Running")))  # fmt: skip
        job = _runner(api, log).run(_body())
        kept = api.cluster.trainjobs[(NS, NAME)]
    assert job["status"]["conditions"][0]["type"] == "Complete"
    assert kept["metadata"]["annotations"][DELETE_AFTER] == str(int(NOW) + 3600)
    assert log[:3] == [
        f"TrainJob {NAME}: created in {NS} (2 nodes)",
        f"TrainJob {NAME}: created, no status yet",
        f"TrainJob {NAME}: node: active 2, ready 2, succeeded 0, failed 0",
    ]  # one line per change, not per poll
    assert log[3] == f"TrainJob {NAME}: Complete=True; node: active 2, ready 2, succeeded 0, failed 0"
    header = next(i for i, line in enumerate(log) if line.startswith("--- node 0"))
    assert log[header + 1].splitlines() == [f"node 0 line {n}" for n in range(145, 150)]  # the last 5 lines
    assert not any(line.startswith("--- node 1") for line in log)  # a healthy node 1 stays out of the log
    assert log[-1] == f"TrainJob {NAME}: kept for 3600 s (deleted by a later launcher after that)"


def test_a_failed_trainjob_is_one_line_error_with_the_failed_nodes_logs_then_deleted():
    log: list[str] = []
    failed = {"conditions": [_condition("Failed", "FailedJobs", "jobset node-0 failed: exit code 1")]}
    with KubernetesAPI() as api:
        api.cluster.controller = Script([RUNNING, failed], on_start=_pods(("Running", "Failed")))
        with pytest.raises(TrainJobFailed) as caught:
            _runner(api, log, ttl_s=0).run(_body())
        assert api.cluster.trainjobs == {} and api.cluster.pods == {}  # ttl 0: deleted, its pods with it
    message = str(caught.value)
    assert message == f"TrainJob {NAME} failed: FailedJobs: jobset node-0 failed: exit code 1 (node logs above)"
    assert [line.split(",")[0] for line in log if line.startswith("---")] == ["--- node 0", "--- node 1"]
    assert f"TrainJob {NAME}: deleted" in log


def test_a_trainjob_that_does_not_finish_in_time_is_deleted():
    log: list[str] = []
    with KubernetesAPI() as api:
        api.cluster.controller = Script([RUNNING])
        with pytest.raises(TrainJobFailed, match=r"did not finish within 0.2 s \(last status: node: active 2"):
            _runner(api, log, timeout_s=0.2, ttl_s=-1).run(_body())  # ttl < 0 keeps finished jobs, not this one
        assert api.cluster.trainjobs == {}


def test_a_retried_launcher_follows_a_completed_job_and_replaces_a_failed_one():
    complete = {"conditions": [_condition("Complete")]}
    with KubernetesAPI() as api:
        earlier = {**_body(), "status": complete}
        earlier["metadata"]["uid"] = "first"
        api.cluster.trainjobs[(NS, NAME)] = earlier
        log: list[str] = []
        _runner(api, log, ttl_s=-1).run(_body())
        assert api.cluster.trainjobs[(NS, NAME)]["metadata"]["uid"] == "first"  # no second TrainJob
        assert f"TrainJob {NAME}: found from an earlier attempt (Complete), following it" in log
        api.cluster.trainjobs[(NS, NAME)]["status"] = {"conditions": [_condition("Failed", "DeadlineExceeded")]}
        api.cluster.controller = Script([RUNNING, RUNNING, complete])
        log.clear()
        _runner(api, log, ttl_s=-1).run(_body())
        replaced = api.cluster.trainjobs[(NS, NAME)]
    assert replaced["metadata"]["uid"] != "first" and replaced["status"] == complete
    assert log[:3] == [f"TrainJob {NAME}: an earlier attempt Failed; replacing it", f"TrainJob {NAME}: deleted",
                       f"TrainJob {NAME}: created in {NS} (2 nodes)"]  # fmt: skip


def test_expired_trainjobs_of_this_project_are_swept_before_a_new_one_starts():
    with KubernetesAPI() as api:
        for name, after in (("old", NOW - 1), ("young", NOW + 60)):
            job = _body(name)
            job["metadata"]["annotations"] = {DELETE_AFTER: str(int(after))}
            api.cluster.trainjobs[(NS, name)] = job
        foreign = _body("foreign")
        foreign["metadata"].update(labels={"app": "other"}, annotations={DELETE_AFTER: "1"})
        api.cluster.trainjobs[(NS, "foreign")] = foreign
        api.cluster.controller = Script([{"conditions": [_condition("Complete")]}])
        log: list[str] = []
        _runner(api, log).run(_body())
        assert sorted(name for _, name in api.cluster.trainjobs) == ["foreign", NAME, "young"]
    assert log[:2] == ["TrainJob old: deleted", "TrainJob old: its TTL had passed"]


def test_cluster_refusals_are_one_line_errors_that_say_what_to_fix():
    with KubernetesAPI() as api:
        api.cluster.runtimes = set()
        with pytest.raises(UserError) as missing:
            _runner(api, []).run(_body())
        api.cluster.runtimes = {"torch-distributed"}
        api.cluster.forbidden = {("create", "trainjobs")}
        with pytest.raises(UserError) as forbidden:
            _runner(api, []).run(_body())
        api.cluster.forbidden = set()
        invalid = _body()
        invalid["spec"]["trainer"]["numNodes"] = "two"
        with pytest.raises(UserError) as refused:
            _runner(api, []).run(invalid)
        assert api.cluster.trainjobs == {}
    assert "ClusterTrainingRuntime 'torch-distributed': HTTP 404" in str(missing.value)
    assert "Kubeflow Trainer >= 2.2 installed" in str(missing.value)
    assert "HTTP 403" in str(forbidden.value) and "manifests/base/rbac.yaml" in str(forbidden.value)
    assert "HTTP 422" in str(refused.value) and "numNodes" in str(refused.value)
    for caught in (missing, forbidden, refused):
        assert "\n" not in str(caught.value)


def test_the_manifests_grant_every_call_the_launcher_makes():
    """The launcher's calls (all paths: sweep, create, take over, replace, wait, logs, TTL) against the rendered
    RBAC of manifests/: the Role for the namespaced ones, the ClusterRole for the cluster's runtimes."""
    from tests.test_deploy_files import _one, _render

    with KubernetesAPI() as api:
        expired = _body("expired")
        expired["metadata"]["annotations"] = {DELETE_AFTER: "1"}
        api.cluster.trainjobs[(NS, "expired")] = expired
        failed = {**_body(), "status": {"conditions": [_condition("Failed")]}}
        api.cluster.trainjobs[(NS, NAME)] = failed
        complete = {"conditions": [_condition("Complete")]}
        api.cluster.controller = Script([RUNNING, complete], on_start=_pods(("Running", "Running")))
        _runner(api, []).run(_body())
        calls = api.cluster.calls
    assert calls == {("list", "trainjobs"), ("delete", "trainjobs"), ("get", "clustertrainingruntimes"),
                     ("create", "trainjobs"), ("get", "trainjobs"), ("list", "pods"), ("get", "pods/log"),
                     ("patch", "trainjobs")}  # fmt: skip
    objects = _render("dev")
    granted = set()
    for role in (_one(objects, "Role", "lora-moe-pipeline-runner"),
                 _one(objects, "ClusterRole", "lora-moe-trainer-runtimes-view")):  # fmt: skip
        granted |= {
            (verb, resource) for rule in role["rules"] for verb in rule["verbs"] for resource in rule["resources"]
        }
    assert calls <= granted, calls - granted
