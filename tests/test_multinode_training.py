"""Stage 2 on two nodes, for real, on this machine: two separate torchrun process groups on loopback (gloo), one
process each, give the checkpoint of one node with two processes; a run whose second node is killed resumes
(--resume auto) to the same checkpoint; and the whole TrainJob path (launcher → TrainJob → ``lora-moe
train-node`` on each node → checkpoint handed back) runs against the local Kubernetes API of tests/k8s_api.py,
with the TrainJob's own command and ``PET_*`` environment started as two processes, as Trainer's Torch plugin
would start them in two pods."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_moe_core.config import load_config
from lora_moe_core.training.launch import launch_trainjob
from lora_moe_core.training.trainjob import Placement
from lora_moe_core.training.trainjob_client import WaitSettings, kube_api
from tests.k8s_api import Cluster, KubernetesAPI, pod
from tests.test_training import DEMO, _stage1, _stage2_argv, _tensors

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# 8 clips / 2 ranks / 2 accumulation steps = 2 steps an epoch; a save after every step, so a kill lands between two
STEPS = {"max_train_steps": 4, "save_every_n_steps": 1, "seed": 1, "num_train_epochs": 20}
FLAGS = [f for key, value in STEPS.items() for f in (f"--{key}", str(value))]
ENV = {**os.environ, "MLFLOW_TRACKING_URI": "none", "OMP_NUM_THREADS": "1"}  # tracking is not what these test


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def stage1(tiny_cache, tmp_path_factory) -> Path:
    return _stage1(tiny_cache, tmp_path_factory.mktemp("stage1"))


@pytest.fixture(scope="module")
def one_node(tiny_cache, stage1, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: one node, two processes."""
    out = tmp_path_factory.mktemp("one-node")
    argv = [TORCHRUN, "--nproc_per_node", "2", "-m", "lora_moe_core", *_stage2_argv(tiny_cache, stage1, out, *FLAGS)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return _tensors(out / "lora_moe_final.safetensors")


def _node(rdzv: str, argv: list[str]) -> subprocess.Popen:
    """One node: its own torchrun (own process group, so that it can be killed whole), c10d rendezvous."""
    command = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv,
               "--rdzv_id", "stage2", "-m", "lora_moe_core", *argv]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)  # fmt: skip


def _both(argv: list[str]) -> list[subprocess.Popen]:
    rdzv = f"127.0.0.1:{_free_port()}"
    return [_node(rdzv, argv), _node(rdzv, argv)]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_nodes_killed_and_resumed_end_as_one_node(tiny_cache, stage1, one_node, tmp_path):
    argv = _stage2_argv(tiny_cache, stage1, tmp_path, *FLAGS)
    nodes = _both(argv)
    deadline = time.monotonic() + 300
    while not (tmp_path / "training_state_step_1.json").exists():
        assert all(n.poll() is None for n in nodes), [n.stderr.read()[-2000:] for n in nodes if n.poll() is not None]
        assert time.monotonic() < deadline, "no step-1 save appeared"
        time.sleep(0.02)
    os.killpg(nodes[1].pid, signal.SIGKILL)  # one node dies: its torchrun and its worker, at once
    nodes[1].wait()
    try:
        survivor = nodes[0].wait(timeout=120)  # its worker's next collective finds the peer gone
    except subprocess.TimeoutExpired:
        os.killpg(nodes[0].pid, signal.SIGKILL)
        survivor = nodes[0].wait()
    assert survivor != 0
    for late in [*tmp_path.glob("*_step_[234]*"), *tmp_path.glob("*final*")]:
        late.unlink()  # if the run outpaced the kill, make it as if it had died right after step 1
    restarted = _both([*argv, "--resume", "auto"])
    codes = [n.wait(timeout=600) for n in restarted]
    assert codes == [0, 0], [n.stderr.read()[-3000:] for n in restarted]
    assert _equal(_tensors(tmp_path / "lora_moe_final.safetensors"), one_node)  # bit-identical


class NodeController:
    """Trainer's part for a TrainJob in tests/k8s_api.py: start ``spec.trainer.command`` once per node with the
    TrainJob's env and the ``PET_*`` variables of the Torch plugin (static rendezvous on node 0), report the
    processes as the TrainJob's status and pods, their output as the pods' logs."""

    def __init__(self, work: Path):
        self.work, self.nodes, self.logs = work, [], []

    def start(self, job: dict) -> None:
        trainer = job["spec"]["trainer"]
        env = {**ENV, **{e["name"]: e["value"] for e in trainer["env"] if "value" in e}}
        port = _free_port()
        command = [str(Path(sys.executable).with_name(trainer["command"][0])), *trainer["command"][1:]]
        for rank in range(trainer["numNodes"]):
            pet = {"PET_NNODES": str(trainer["numNodes"]), "PET_NODE_RANK": str(rank),
                   "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}  # fmt: skip
            log = self.work / f"node-{rank}.log"
            self.logs.append(log)
            with log.open("w") as handle:  # each pod has its own /tmp: a work dir per node
                argv = [*command, "--work_dir", str(self.work / f"node-{rank}")]
                self.nodes.append(subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env={**env, **pet}))

    def __call__(self, cluster: Cluster) -> None:
        ((namespace, name), job), *_ = list(cluster.trainjobs.items()) or [((None, None), None)]
        if job is None:
            return
        if not self.nodes:
            self.start(job)
        codes = [n.poll() for n in self.nodes]
        counts = {"active": codes.count(None), "ready": codes.count(None), "succeeded": codes.count(0),
                  "failed": sum(c not in (None, 0) for c in codes)}  # fmt: skip
        job["status"] = {"jobsStatus": [{"name": "node", **counts}]}
        if counts["failed"] or counts["succeeded"] == len(codes):
            kind = "Failed" if counts["failed"] else "Complete"
            job["status"]["conditions"] = [{"type": kind, "status": "True", "reason": f"Jobs{kind}"}]
        for rank, code in enumerate(codes):
            phase = "Running" if code is None else "Succeeded" if code == 0 else "Failed"
            node = pod(namespace, name, rank, phase)
            cluster.pods[(namespace, node["metadata"]["name"])] = node
            cluster.logs[(namespace, node["metadata"]["name"])] = self.logs[rank].read_text(errors="replace")


def test_the_trainjob_path_end_to_end_gives_the_one_node_checkpoint(tiny_cache, stage1, one_node, tmp_path):
    overrides = {"training_stage": "stage_b", "cache": tiny_cache, "base_lora_weights": str(stage1),
                 "output_dir": str(tmp_path / "launcher" / "lora_moe_stage_b"), **STEPS}  # fmt: skip
    config = load_config(DEMO / "lora_moe_stage_b_merged.toml", overrides)
    controller = NodeController(tmp_path)
    log: list[str] = []
    with KubernetesAPI() as api:
        api.cluster.controller = controller
        history = launch_trainjob(
            config, num_nodes=2, gpus_per_node=1, placement=Placement(image="registry.example.com/t:dev"),
            run_uri=str(tmp_path / "run"), name="lora-moe-s2-e2e", namespace="kubeflow",
            wait=WaitSettings(timeout_s=600, poll_s=0.5, ttl_s=0, log_lines=3), api=kube_api(api.url), log=log.append,
        )  # fmt: skip
        assert api.cluster.trainjobs == {}  # ttl 0
    assert [n.returncode for n in controller.nodes] == [0, 0]
    handed_on = _tensors(tmp_path / "launcher" / "lora_moe_stage_b" / "lora_moe_final.safetensors")
    assert _equal(handed_on, one_node)
    assert _equal(_tensors(tmp_path / "run" / "stage2" / "lora_moe_final.safetensors"), one_node)
    assert history[-1]["routed_clips"] == 8 and int(history[-1]["epoch"]) == 2  # both nodes' 4 clips merged
    assert any(line.startswith("--- node 0, pod lora-moe-s2-e2e-node-0-0") for line in log)
    assert "TrainJob lora-moe-s2-e2e: deleted" in log
