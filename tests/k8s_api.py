"""A local HTTP server speaking the Kubernetes API for the calls the Stage-2 TrainJob launcher makes.

No kube-apiserver can be installed here (none on PyPI or in Debian), so this serves, on loopback, the few
endpoints the launcher's ``kubernetes`` client uses, in the API's own wire format (JSON objects, ``Status``
errors with their HTTP codes, label selectors, merge patches):

- ``clustertrainingruntimes/{name}``: GET
- ``namespaces/{ns}/trainjobs``: POST (checked against the vendored Trainer CRD's OpenAPI schema, unknown fields
  refused, and its metadata.name rules, as an API server with ``fieldValidation=Strict`` would: 422), GET (list,
  ``labelSelector``); ``trainjobs/{name}``: GET, PATCH (merge patch), DELETE
- ``namespaces/{ns}/pods``: GET (list, ``labelSelector``); ``pods/{name}/log``: GET (``tailLines``)

What a cluster's controllers would do (set a TrainJob's status, make its pods) is the test's: ``controller`` is
called with the cluster before every read of a TrainJob. ``forbidden`` holds ``(verb, resource)`` pairs answered
403, as RBAC would.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonschema
import yaml

CRD = Path(__file__).parent / "data" / "kubeflow_trainer" / "trainer.kubeflow.org_trainjobs.yaml"
_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_TRAINER = r"/apis/trainer\.kubeflow\.org/v1alpha1"
_ROUTES = [
    ("runtime", re.compile(_TRAINER + r"/clustertrainingruntimes/(?P<name>[^/]+)$")),
    ("trainjobs", re.compile(_TRAINER + r"/namespaces/(?P<ns>[^/]+)/trainjobs$")),
    ("trainjob", re.compile(_TRAINER + r"/namespaces/(?P<ns>[^/]+)/trainjobs/(?P<name>[^/]+)$")),
    ("pods", re.compile(r"/api/v1/namespaces/(?P<ns>[^/]+)/pods$")),
    ("log", re.compile(r"/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log$")),
]


def strict(schema):
    """The CRD schema with unknown fields refused: an API server drops them (pruning), which would lose a
    misspelled field silently; here they fail. Objects marked preserve-unknown-fields stay open."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def trainjob_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                       "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
                       "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
        "required": ["name"],
        "additionalProperties": False,
    }  # fmt: skip
    return schema


def validate_trainjob(body: dict, validator: jsonschema.Validator | None = None) -> list[str]:
    """What an API server would refuse in ``body``: schema errors, then the CRD's CEL rules on metadata.name."""
    validator = validator or jsonschema.Draft7Validator(trainjob_schema())
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(body)]
    name = body.get("metadata", {}).get("name", "")
    if not _RFC1035.fullmatch(name):
        problems.append("metadata.name must match RFC 1035 DNS label format")
    if len(name) > 63:
        problems.append("metadata.name must be no more than 63 characters")
    if (body.get("apiVersion"), body.get("kind")) != ("trainer.kubeflow.org/v1alpha1", "TrainJob"):
        problems.append("apiVersion/kind must be trainer.kubeflow.org/v1alpha1 TrainJob")
    return problems


def _selected(labels: dict, selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _merge(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


@dataclass
class Cluster:
    """The server's state; tests read and change it (under ``lock``)."""

    runtimes: set[str] = field(default_factory=lambda: {"torch-distributed"})
    trainjobs: dict[tuple[str, str], dict] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict] = field(default_factory=dict)
    logs: dict[tuple[str, str], str] = field(default_factory=dict)
    forbidden: set[tuple[str, str]] = field(default_factory=set)
    controller: Callable[[Cluster], None] = lambda cluster: None
    requests: list[tuple[str, str]] = field(default_factory=list)
    calls: set[tuple[str, str]] = field(default_factory=set)  # (verb, resource) as RBAC names them
    lock: threading.RLock = field(default_factory=threading.RLock)


class _Handler(BaseHTTPRequestHandler):
    cluster: Cluster
    validator: jsonschema.Validator

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def _send(self, code: int, body, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": message, "reason": reason, "code": code})  # fmt: skip

    def _body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def _route(self):
        parts = urlsplit(self.path)
        for kind, pattern in _ROUTES:
            if match := pattern.match(parts.path):
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                return kind, match.groupdict(), query
        return None, {}, {}

    def _handle(self, verb: str) -> None:
        kind, args, query = self._route()
        cluster = self.cluster
        with cluster.lock:
            cluster.requests.append((verb, self.path))
            if kind is None:
                return self._status(404, "NotFound", f"the server could not find the requested resource {self.path}")
            resource = {"runtime": "clustertrainingruntimes", "trainjobs": "trainjobs", "trainjob": "trainjobs",
                        "pods": "pods", "log": "pods/log"}[kind]  # fmt: skip
            cluster.calls.add((verb, resource))
            if (verb, resource) in cluster.forbidden:
                return self._status(403, "Forbidden", f'{resource} is forbidden: cannot {verb} resource "{resource}"')
            if kind in ("trainjob", "trainjobs") and verb in ("get", "list"):
                cluster.controller(cluster)
            getattr(self, f"_{verb}_{kind}")(cluster, args, query)

    def do_GET(self) -> None:  # noqa: N802
        kind, args, _ = self._route()
        self._handle("list" if kind in ("trainjobs", "pods") else "get")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("create")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("patch")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("delete")

    # -- the endpoints ---------------------------------------------------------------------------------------------
    def _get_runtime(self, cluster: Cluster, args, query) -> None:
        if args["name"] not in cluster.runtimes:
            return self._status(404, "NotFound", f'clustertrainingruntimes.trainer.kubeflow.org "{args["name"]}" '
                                                 "not found")  # fmt: skip
        self._send(
            200,
            {
                "apiVersion": "trainer.kubeflow.org/v1alpha1",
                "kind": "ClusterTrainingRuntime",
                "metadata": {"name": args["name"], "labels": {"trainer.kubeflow.org/framework": "torch"}},
            },
        )

    def _create_trainjobs(self, cluster: Cluster, args, query) -> None:
        body = self._body()
        if problems := validate_trainjob(body, self.validator):
            return self._status(422, "Invalid", "TrainJob is invalid: " + "; ".join(problems[:5]))
        key = (args["ns"], body["metadata"]["name"])
        if key in cluster.trainjobs:
            return self._status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{key[1]}" already exists')
        body["metadata"].update(namespace=args["ns"], uid=str(uuid.uuid4()), resourceVersion="1")
        cluster.trainjobs[key] = body
        self._send(201, body)

    def _list_trainjobs(self, cluster: Cluster, args, query) -> None:
        selector = query.get("labelSelector", "")
        items = [j for (ns, _), j in sorted(cluster.trainjobs.items())
                 if ns == args["ns"] and _selected(j["metadata"].get("labels", {}), selector)]  # fmt: skip
        self._send(200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList", "items": items})

    def _job(self, cluster: Cluster, args) -> dict | None:
        job = cluster.trainjobs.get((args["ns"], args["name"]))
        if job is None:
            self._status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{args["name"]}" not found')
        return job

    def _get_trainjob(self, cluster: Cluster, args, query) -> None:
        if (job := self._job(cluster, args)) is not None:
            self._send(200, job)

    def _patch_trainjob(self, cluster: Cluster, args, query) -> None:
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            return self._status(415, "UnsupportedMediaType", "only merge patches are served here")
        if (job := self._job(cluster, args)) is not None:
            self._send(200, _merge(job, self._body()))

    def _delete_trainjob(self, cluster: Cluster, args, query) -> None:
        if self._job(cluster, args) is not None:
            del cluster.trainjobs[(args["ns"], args["name"])]
            for key in [k for k, pod in cluster.pods.items() if k[0] == args["ns"] and
                        pod["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == args["name"]]:  # fmt: skip
                del cluster.pods[key]  # the owner references' garbage collection
            self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    def _list_pods(self, cluster: Cluster, args, query) -> None:
        selector = query.get("labelSelector", "")
        items = [p for (ns, _), p in sorted(cluster.pods.items())
                 if ns == args["ns"] and _selected(p["metadata"]["labels"], selector)]  # fmt: skip
        self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})

    def _get_log(self, cluster: Cluster, args, query) -> None:
        key = (args["ns"], args["name"])
        if key not in cluster.pods:
            return self._status(404, "NotFound", f'pods "{args["name"]}" not found')
        lines = cluster.logs.get(key, "").splitlines(keepends=True)
        tail = int(query.get("tailLines", len(lines)))
        self._send(200, "".join(lines[-tail:] if tail else []), "text/plain")


class KubernetesAPI:
    """``with KubernetesAPI() as api:`` serves on ``api.url`` until the block ends; ``api.cluster`` is its state."""

    def __init__(self) -> None:
        self.cluster = Cluster()
        handler = type(
            "Handler",
            (_Handler,),
            {"cluster": self.cluster, "validator": jsonschema.Draft7Validator(trainjob_schema())},
        )
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> KubernetesAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()


def pod(namespace: str, trainjob: str, index: int, phase: str) -> dict:
    """A node pod as Trainer's JobSet makes it (the labels the launcher selects by)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{trainjob}-node-0-{index}-x{index}", "namespace": namespace,
                         "labels": {"jobset.sigs.k8s.io/jobset-name": trainjob,
                                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                    "batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"phase": phase}}  # fmt: skip
