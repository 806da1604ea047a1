"""Shared fixtures: a tiny random WAN2.2 DiT (diffusers' own test shape, 4 blocks) and a seeded RNG."""

from __future__ import annotations

import os

import pytest
import torch

from lora_moe_core.config import Config, load_config
from lora_moe_core.model.wan import build_transformer
from tests.mlflow_server import mlflow_s3_server, mlflow_server  # noqa: F401  (real MLflow server)
from tests.s3_server import s3_env, s3_server  # noqa: F401  (real SeaweedFS S3 for the storage tests)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The container tests run last (a stable sort keeps every other order): right after them, a test of the
    session's shared MLflow server twice found no run link printed (cause not established; the server was still
    busy with the containers' work, or its request timed out), and they are the slowest tests to wait for."""
    items.sort(key=lambda item: item.path.name == "test_images.py")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    # start_tracker sets these process-wide when unset (by design, for MLflow's per-request reads): drop what an
    # earlier test's tracker left, outside monkeypatch so that a test's undo() cannot bring it back
    os.environ.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
    os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)


@pytest.fixture
def tiny_config() -> Config:
    return load_config(None, {"task": "tiny"})


@pytest.fixture
def tiny_transformer() -> torch.nn.Module:
    return build_transformer("tiny", seed=0)


@pytest.fixture
def tiny_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 16, 3, 8, 8, generator=generator),  # [B, C, F, H, W] latents
        "timestep": torch.tensor([950.0, 300.0]),  # one high-noise, one low-noise sample
        "encoder_hidden_states": torch.randn(2, 12, 16, generator=generator),  # [B, L, text_dim]
    }


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    """8 synthetic clips (64×48, 17 frames) cached for the tiny model: the training tests' dataset."""
    from lora_moe_core.cli.main import main
    from lora_moe_core.data.synth import generate_dataset

    folder = tmp_path_factory.mktemp("train-data")
    generate_dataset(folder / "data", 8, seed=0, width=64, height=48, num_frames=17)
    argv = ["cache", "--dataset", str(folder / "data"), "--task", "tiny", "--output", str(folder / "cache"),
            "--target_frames", "17"]  # fmt: skip
    assert main(argv) == 0
    return str(folder / "cache")
