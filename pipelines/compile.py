"""Compile the pipelines to KFP IR YAML and read a compiled package back, checked against the KFP protos."""

from __future__ import annotations

import os
from pathlib import Path

from components.k8s import ClusterSettings
from lora_moe_core.errors import UserError, disk_full_reason
from lora_moe_core.guards.files import removed_on_failure

PACKAGES = {"training": "lora_moe_training.yaml", "inference": "lora_moe_inference.yaml"}


def build(name: str, settings: ClusterSettings | None = None):
    """The pipeline ``name`` (training or inference) built for ``settings``."""
    if name == "training":
        from pipelines.training import build_training_pipeline

        return build_training_pipeline(settings)
    if name == "inference":
        from pipelines.inference import build_inference_pipeline

        return build_inference_pipeline(settings)
    raise UserError(f"unknown pipeline {name!r}: one of {', '.join(PACKAGES)}")


def compile_pipeline(name: str, path: str | Path, settings: ClusterSettings | None = None) -> Path:
    """Write pipeline ``name`` as IR YAML to ``path`` (checked by reading it back against the protos)."""
    from kfp import compiler

    path = Path(path)
    pipeline = build(name, settings)  # its own errors are its own, not a write failure
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")  # compiled in place, a full disk left half a YAML
    try:
        with removed_on_failure(path.parent):
            compiler.Compiler().compile(pipeline, str(temporary))
            os.replace(temporary, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {disk_full_reason(exc) or exc.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)
    load_ir(path)
    return path


def compile_all(output_dir: str | Path, settings: ClusterSettings | None = None) -> dict[str, Path]:
    """Both pipelines into ``output_dir``; returns ``{name: path}``."""
    return {name: compile_pipeline(name, Path(output_dir) / file, settings) for name, file in PACKAGES.items()}


def load_ir(path: str | Path):
    """``(PipelineSpec, PlatformSpec | None)`` of a compiled package, parsed strictly (unknown fields fail), with
    every executor's Kubernetes config parsed as a ``KubernetesExecutorConfig``.

    Raises:
        UserError: when the file is missing or is not a valid KFP v2 pipeline package.
    """
    import yaml
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    path = Path(path)
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    except OSError as exc:
        raise UserError(f"cannot read pipeline package {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not YAML: {str(exc).splitlines()[0]}") from None
    try:
        spec = json_format.ParseDict(documents[0], pipeline_spec_pb2.PipelineSpec())
        platform = json_format.ParseDict(documents[1], pipeline_spec_pb2.PlatformSpec()) if len(documents) > 1 else None
        if platform is not None and "kubernetes" in platform.platforms:
            for config in platform.platforms["kubernetes"].deployment_spec.executors.values():
                json_format.ParseDict(
                    json_format.MessageToDict(config), kubernetes_executor_config_pb2.KubernetesExecutorConfig()
                )
    except (json_format.ParseError, IndexError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is not a KFP v2 pipeline package: {str(exc).splitlines()[0]}") from None
    if not spec.pipeline_info.name or not spec.root.dag.tasks:
        raise UserError(f"{path} is not a KFP v2 pipeline package (no pipeline name or no tasks)")
    return spec, platform
