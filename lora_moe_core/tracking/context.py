"""Where a step's MLflow run goes: the experiment, the pipeline's parent run and the KFP linkage tags.

One value carries it from the pipeline into the library. The pipeline's ``start-tracking`` step returns it as a
dict (:meth:`TrackingContext.to_dict`); a component turns that dict and its task name into a context
(:meth:`TrackingContext.from_step`) and passes it to the library function it calls. Only across a process boundary
(``torchrun`` workers, a plain ``lora-moe`` command) does it travel as environment variables
(:meth:`environ` / :meth:`from_env`), under the names the KFP and MLflow documentation use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_moe_core.defaults import EXPERIMENT

#: dict / environment key of each field
_KEYS = {
    "experiment": "MLFLOW_EXPERIMENT_NAME",
    "parent_run_id": "MLFLOW_PARENT_RUN_ID",
    "kfp_run_id": "KFP_RUN_ID",
    "kfp_run_name": "KFP_RUN_NAME",
    "kfp_task": "KFP_TASK_NAME",
}
#: MLflow tag of each KFP field
_KFP_TAGS = {"kfp_run_id": "kfp.run_id", "kfp_run_name": "kfp.run_name", "kfp_task": "kfp.task"}


@dataclass(frozen=True)
class TrackingContext:
    """The MLflow experiment and parent run of a step, and the KFP run/task it belongs to (empty: none)."""

    experiment: str = EXPERIMENT
    parent_run_id: str = ""
    kfp_run_id: str = ""
    kfp_run_name: str = ""
    kfp_task: str = ""

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> TrackingContext:
        """From a dict or environment keyed as :meth:`to_dict` writes it; missing keys keep the defaults."""
        fields = {name: str(values[key]) for name, key in _KEYS.items() if values.get(key)}
        return cls(**fields)

    @classmethod
    def from_env(cls) -> TrackingContext:
        """What a pipeline step's process was given (``lora-moe`` commands and ``torchrun`` workers)."""
        return cls.from_mapping(os.environ)

    @classmethod
    def from_step(cls, tracking: Mapping[str, str], task_name: str) -> TrackingContext:
        """A component's context: ``start-tracking``'s output plus the task's own name."""
        return cls.from_mapping({**tracking, _KEYS["kfp_task"]: task_name})

    def to_dict(self) -> dict[str, str]:
        """The JSON-ready form that travels between pipeline steps (and, as strings, in the environment)."""
        return {key: getattr(self, name) for name, key in _KEYS.items()}

    def environ(self) -> dict[str, str]:
        """Environment variables that hand this context to a child process; empty fields are left out."""
        return {key: value for key, value in self.to_dict().items() if value}

    def tags(self) -> dict[str, str]:
        """The KFP linkage tags of the step's MLflow run."""
        return {tag: getattr(self, name) for name, tag in _KFP_TAGS.items() if getattr(self, name)}

    def start_run(self, run_name: str, stage: str, output_dir: str | Path, tracking_uri: str | None = None):
        """Open the step's MLflow run (a child of the parent run, if any); see ``tracker.start_tracker``."""
        from lora_moe_core.tracking.tracker import start_tracker

        return start_tracker(run_name, tracking_uri=tracking_uri, tags={"stage": stage}, output_dir=output_dir,
                             context=self)  # fmt: skip
