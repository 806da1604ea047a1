"""Create a TrainJob, follow it to Complete or Failed, print its nodes' logs, and keep or delete it by a TTL.

Through the ``kubernetes`` client's ``CustomObjectsApi``/``CoreV1Api`` (a dependency of kfp, so in every image):
the Kubeflow SDK's ``TrainerClient`` names jobs at random (a retried step would start a second job) and waits
without reporting progress. The launcher's step log shows each change of the TrainJob's conditions and of its
``node`` jobs' pod counts, then the last lines of node 0's log and of every failed node's.

A retried launcher finds the TrainJob of its first attempt by name: it follows one still running, reuses one that
completed, and replaces one that failed (the new one resumes from the saves under the run's ``stage2/``).

TTL: ``ttl_s`` 0 deletes the finished TrainJob at once (pods, logs and all), a negative value keeps it, a positive
one marks it ``lora-moe/delete-after`` and the next launcher in the namespace deletes it once that time has passed.
A TrainJob still running at the timeout is deleted whatever the TTL: it holds GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_moe_core.errors import UserError, one_line
from lora_moe_core.training.trainjob import API_GROUP, API_VERSION, NODE, PART_OF, PLURAL

DELETE_AFTER = "lora-moe/delete-after"  # annotation: Unix time after which a later launcher deletes the TrainJob
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # Trainer runs a TrainJob as a JobSet of the same name
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # the node's rank (PET_NODE_RANK)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
Log = Callable[[str], None]


@dataclass(frozen=True)
class WaitSettings:
    """How long to wait (``timeout_s``), how often to look (``poll_s``), what to keep (``ttl_s``, see module),
    how many log lines of each reported node to print."""

    timeout_s: float
    poll_s: float = 10.0
    ttl_s: int = 86400
    log_lines: int = 100


class TrainJobFailed(UserError):
    """The TrainJob ended Failed or did not end in time (one line: name, reason, message)."""


def kube_api(host: str | None = None):
    """An ``ApiClient``: the pod's service account in a cluster, else ``~/.kube/config``; ``host``: that server
    without credentials (a local API server)."""
    from kubernetes import client, config

    if host:
        return client.ApiClient(client.Configuration(host=host))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise UserError(f"no Kubernetes API for the TrainJob (not in a pod, no kubeconfig): {exc}") from None
    return client.ApiClient()


def current_namespace(default: str = "default") -> str:
    """The pod's own namespace (its service account's), where the pipeline's secrets are."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or default
    except OSError:
        return default


def _api_error(exc, what: str) -> UserError:
    """A refused call as one line; 403 names the RBAC the launcher needs."""
    hint = {403: " (the step's service account needs the trainer.kubeflow.org rules of manifests/base/rbac.yaml)",
            404: " (is Kubeflow Trainer >= 2.2 installed, with its default runtimes?)"}.get(exc.status, "")  # fmt: skip
    return UserError(f"{what}: HTTP {exc.status} {exc.reason}: {one_line(exc.body or '')[:300]}{hint}")


def outcome(job: dict[str, Any]) -> str | None:
    """``Complete`` or ``Failed`` once a terminal condition is true, else None."""
    for condition in job.get("status", {}).get("conditions", []):
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return None


def describe(job: dict[str, Any]) -> str:
    """One status line: the latest condition, then each replicated job's pod counts."""
    status = job.get("status", {})
    conditions = status.get("conditions", [])
    parts = []
    if conditions:
        last = conditions[-1]
        parts.append(f"{last.get('type')}={last.get('status')} {last.get('reason', '')}".strip())
    for item in status.get("jobsStatus", []):
        counts = ", ".join(f"{k} {item.get(k, 0)}" for k in ("active", "ready", "succeeded", "failed"))
        parts.append(f"{item.get('name')}: {counts}")
    return "; ".join(parts) or "created, no status yet"


def _failure(job: dict[str, Any]) -> str:
    for condition in job.get("status", {}).get("conditions", []):
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}".rstrip(": ")
    return "Failed"


class TrainJobRunner:
    """One TrainJob's life from a launcher step: :meth:`run` is the whole of it."""

    def __init__(self, api, settings: WaitSettings, log: Log = print, clock: Callable[[], float] = time.time):
        from kubernetes import client

        self.custom, self.core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        self.settings, self.log, self.clock = settings, log, clock

    # -- the API calls --------------------------------------------------------------------------------------------
    def _get(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"reading TrainJob {name}") from None

    def _delete(self, namespace: str, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        options = client.V1DeleteOptions(propagation_policy="Background")  # the JobSet and pods go with it
        try:
            self.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name, body=options)
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(exc, f"deleting TrainJob {name}") from None
        self.log(f"TrainJob {name}: deleted")

    def check_runtime(self, name: str) -> None:
        """The ClusterTrainingRuntime must exist: a TrainJob naming a missing one is accepted and never runs."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.get_cluster_custom_object(API_GROUP, API_VERSION, "clustertrainingruntimes", name)
        except ApiException as exc:
            raise _api_error(exc, f"ClusterTrainingRuntime {name!r}") from None

    def sweep(self, namespace: str) -> list[str]:
        """Delete this project's TrainJobs whose ``delete-after`` time has passed; returns their names."""
        from kubernetes.client.exceptions import ApiException

        selector = ",".join(f"{k}={v}" for k, v in PART_OF.items())
        try:
            listed = self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL,
                                                               label_selector=selector)  # fmt: skip
        except ApiException as exc:
            raise _api_error(exc, "listing TrainJobs") from None
        expired = []
        for item in listed.get("items", []):
            after = item["metadata"].get("annotations", {}).get(DELETE_AFTER, "")
            if after.isdigit() and int(after) <= self.clock():
                self._delete(namespace, item["metadata"]["name"])
                expired.append(item["metadata"]["name"])
        return expired

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create the TrainJob, or take over the one a previous attempt of this step created."""
        from kubernetes.client.exceptions import ApiException

        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            created = self.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, body)
            self.log(f"TrainJob {name}: created in {namespace} ({body['spec']['trainer']['numNodes']} nodes)")
            return created
        except ApiException as exc:
            if exc.status != 409:
                raise _api_error(exc, f"creating TrainJob {name}") from None
        existing = self._get(namespace, name)
        state = outcome(existing) if existing else "gone"
        if existing is not None and state != "Failed":
            self.log(f"TrainJob {name}: found from an earlier attempt ({state or 'running'}), following it")
            return existing
        self.log(f"TrainJob {name}: an earlier attempt {state}; replacing it")
        self._delete(namespace, name)
        deadline = time.monotonic() + self.settings.timeout_s
        while self._get(namespace, name) is not None:  # deletion is asynchronous (finalizers, GC)
            if time.monotonic() > deadline:
                raise TrainJobFailed(f"TrainJob {name}: the failed earlier attempt was not deleted in time")
            time.sleep(self.settings.poll_s)
        return self.submit(body)

    def wait(self, namespace: str, name: str) -> dict[str, Any]:
        """Poll until Complete or Failed, printing each change; TrainJobFailed after ``timeout_s``."""
        deadline = time.monotonic() + self.settings.timeout_s
        last = ""
        while True:
            job = self._get(namespace, name)
            if job is None:
                raise TrainJobFailed(f"TrainJob {name} was deleted while the launcher waited for it")
            line = describe(job)
            if line != last:
                self.log(f"TrainJob {name}: {line}")
                last = line
            if outcome(job):
                return job
            if time.monotonic() > deadline:
                self.print_logs(namespace, name)
                self._delete(namespace, name)  # still running: it holds GPUs, whatever the TTL says
                raise TrainJobFailed(f"TrainJob {name} did not finish within {self.settings.timeout_s:g} s "
                                     f"(last status: {line}); it was deleted")  # fmt: skip
            time.sleep(self.settings.poll_s)

    def print_logs(self, namespace: str, name: str) -> None:
        """The last lines of node 0 and of every failed node (a log that cannot be read is said, not fatal)."""
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self.core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_LABEL}={name}").items
        except ApiException as exc:
            self.log(f"TrainJob {name}: pods not listed ({exc.status} {exc.reason})")
            return
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            index = (pod.metadata.labels or {}).get(INDEX_LABEL, "?")
            phase = pod.status.phase if pod.status else "?"
            if index != "0" and phase != "Failed":
                continue
            try:
                text = self.core.read_namespaced_pod_log(pod.metadata.name, namespace, container=NODE,
                                                         tail_lines=self.settings.log_lines)  # fmt: skip
            except ApiException as exc:
                text = f"(log not readable: {exc.status} {exc.reason})"
            self.log(f"--- node {index}, pod {pod.metadata.name} ({phase}): last {self.settings.log_lines} lines ---")
            self.log(text.rstrip("\n"))

    def finish(self, job: dict[str, Any]) -> None:
        """Apply the TTL to a finished TrainJob."""
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        ttl = self.settings.ttl_s
        if ttl == 0:
            self._delete(namespace, name)
        elif ttl > 0:
            after = str(int(self.clock() + ttl))
            from kubernetes.client.exceptions import ApiException

            body = {"metadata": {"annotations": {DELETE_AFTER: after}}}
            try:
                self.custom.patch_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name, body)
            except ApiException as exc:
                raise _api_error(exc, f"marking TrainJob {name} for deletion after {ttl} s") from None
            self.log(f"TrainJob {name}: kept for {ttl} s (deleted by a later launcher after that)")
        else:
            self.log(f"TrainJob {name}: kept (ttl < 0); delete it with kubectl delete trainjob {name}")

    def run(self, body: dict[str, Any]) -> dict[str, Any]:
        """Sweep expired jobs, check the runtime, create (or take over), wait, print logs, apply the TTL.

        Raises:
            TrainJobFailed: the TrainJob failed (after its logs were printed and the TTL applied) or timed out.
        """
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        for expired in self.sweep(namespace):
            self.log(f"TrainJob {expired}: its TTL had passed")
        self.check_runtime(body["spec"]["runtimeRef"]["name"])
        self.submit(body)
        job = self.wait(namespace, name)
        self.print_logs(namespace, name)
        self.finish(job)
        if outcome(job) == "Failed":
            raise TrainJobFailed(f"TrainJob {name} failed: {one_line(_failure(job))} (node logs above)")
        return job
