"""The optimisation loop shared by every stage: accumulation, clipping, logging, saving, resuming, stopping.

A recipe (Stage 1 or Stage 2/3) supplies the model, the loss of one micro-batch and its checkpoint format;
this loop owns everything else. Randomness per micro-batch comes from :func:`data.step_generator`, so the
state to resume is only weights, optimizer moments, the step counters, the running sums of the current epoch
and the early-stopping history: a run killed at any step and resumed from its last save ends with the same
weights, bit for bit on CPU, as one never interrupted (as torchrun-style restartable jobs expect). A SIGTERM
(a pod being deleted or preempted) ends the run after the current optimizer step with such a save and exit code
143 (:mod:`lora_moe_core.signals`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from lora_moe_core.config import Config, config_to_dict
from lora_moe_core.data.latent_cache import CacheEntry
from lora_moe_core.errors import DiskFullError, Stopped, UserError, disk_full_reason
from lora_moe_core.signals import GracefulStop
from lora_moe_core.tracking.tracker import Tracker
from lora_moe_core.training import state as run_state
from lora_moe_core.training.batches import Batch, collate, epoch_batches, step_generator
from lora_moe_core.training.monitor import EarlyStopping, EpochStats
from lora_moe_core.training.plots import plot_history


class Recipe(Protocol):
    """What a stage provides to the loop."""

    checkpoint_prefix: str  # "lora" (Stage 1) or "lora_moe" (Stages 2, 3)

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def loss_step(self, batch: Batch, generator: torch.Generator, progress: float,
                  stats: EpochStats) -> tuple[torch.Tensor, dict[str, float]]: ...  # fmt: skip

    def after_optimizer_step(self) -> None: ...

    def save(self, path: Path) -> Path: ...

    def load(self, path: Path) -> None: ...


class TrainingDiverged(UserError):
    """A NaN/Inf loss: the run stops, keeping the last good checkpoint."""


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    micro_step: int = 0  # micro-batches done in the current epoch
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: str | None = None
    stats: EpochStats = field(default_factory=EpochStats)  # sums of the current epoch's micro-batches so far

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "micro_step": self.micro_step, "history": self.history,
                "early_stopping": self.early_stopping.state(), "stopped": self.stopped,
                "epoch_stats": self.stats.state()}  # fmt: skip

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> LoopState:
        """The loop's counters and statistics of a marker that ``state.read_state`` checked."""
        stopping = EarlyStopping(**payload.get("early_stopping", {}))
        stats = EpochStats.from_state(payload["epoch_stats"]) if "epoch_stats" in payload else EpochStats()
        return cls(payload["step"], payload["epoch"], payload["micro_step"], stopping, payload.get("history", []),
                   payload.get("stopped"), stats)  # fmt: skip


class TrainingLoop:
    """Runs a recipe over cached entries.

    Args:
        config: the run config.
        recipe: the stage.
        entries: the cached clips.
        output_dir: run folder.
        tracker: where metrics go (MLflow or nothing).
        device: compute device of the batches.
    """

    def __init__(self, config: Config, recipe: Recipe, entries: list[CacheEntry], output_dir: Path,
                 tracker: Tracker, device: torch.device, rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        self.config, self.recipe, self.entries = config, recipe, entries
        self.output_dir, self.tracker, self.device = output_dir, tracker, device
        self.rank, self.world_size = rank, world_size
        training = config.training
        self.optimizer = torch.optim.AdamW(recipe.trainable_parameters(), lr=training.learning_rate,
                                           weight_decay=training.weight_decay)  # fmt: skip
        self.state = LoopState()
        self.batches_per_epoch = len(self._epoch_batches(0))
        steps_per_epoch = math.ceil(self.batches_per_epoch / training.gradient_accumulation_steps)
        self.total_steps = training.num_train_epochs * steps_per_epoch
        if training.max_train_steps is not None:
            self.total_steps = min(self.total_steps, training.max_train_steps)
        self.last_checkpoint: Path | None = None
        self.stop = GracefulStop()  # entered by run(): a SIGTERM stops after the current optimizer step

    # -- resume -----------------------------------------------------------------------------------------------
    def resume(self, marker: Path) -> None:
        """Continue from a complete save (weights, optimizer moments, counters, early-stopping history)."""
        payload = run_state.read_state(marker)
        state = LoopState.from_json(payload)
        self.recipe.load(marker.parent / payload["checkpoint"])
        run_state.load_optimizer(self.optimizer, marker.parent / payload["optimizer"])
        self.state = state
        per_rank = payload.get("epoch_stats_per_rank", [])
        if len(per_rank) == self.world_size:  # this rank's share of the interrupted epoch
            self.state.stats = EpochStats.from_state(per_rank[self.rank])
        self.last_checkpoint = marker.parent / payload["checkpoint"]
        print(f"resumed from {marker.name}: step {self.state.step}, epoch {self.state.epoch + 1}")

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train until the epochs, ``max_train_steps`` or an early-stopping rule end it; returns the final file.

        Raises:
            Stopped: a SIGTERM came; the step it came in was finished and saved (exit code 143).
        """
        with self.stop:
            return self._run()

    def _run(self) -> Path:
        self.tracker.log_params(config_to_dict(self.config))
        training = self.config.training
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc=training.training_stage, unit="step",
                   disable=None)  # fmt: skip
        while self.state.epoch < training.num_train_epochs:
            if self.state.micro_step < self.batches_per_epoch and not self._done():
                self._run_epoch(bar)
            if self.state.micro_step < self.batches_per_epoch:
                break  # max_train_steps reached mid-epoch
            self._end_epoch()  # also when a save made right at the epoch's last step was resumed from
            if self._done():
                break
        bar.close()
        final = self.output_dir / f"{self.recipe.checkpoint_prefix}_final.safetensors"
        if self.rank != 0:
            return final
        state_file = self.output_dir / "training_state_final.json"
        with self._disk_errors(final):
            self.recipe.save(final)
            run_state.write_json(state_file, {**self.state.to_json(), "checkpoint": final.name})
        self.tracker.log_artifact(final, "checkpoints")
        self.tracker.log_artifact(state_file, "checkpoints")
        for plot in plot_history(self.state.history, self.output_dir):
            self.tracker.log_artifact(plot, "plots")
        return final

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches: every world_size-th, equal counts on all ranks (collectives stay paired)."""
        training = self.config.training
        batches = epoch_batches(self.entries, training.batch_size, training.seed, epoch)
        usable = len(batches) - len(batches) % self.world_size
        if usable == 0:
            raise UserError(f"{len(batches)} micro-batches cannot be shared by {self.world_size} processes")
        return batches[:usable][self.rank :: self.world_size]

    def _done(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped is not None

    def _run_epoch(self, bar: tqdm) -> None:
        training, stats = self.config.training, self.state.stats
        batches = self._epoch_batches(self.state.epoch)
        accumulation = training.gradient_accumulation_steps
        started = time.perf_counter()
        for micro_step in range(self.state.micro_step, len(batches)):
            batch = collate([self.entries[i] for i in batches[micro_step]]).to(self.device)
            generator = step_generator(training.seed, self.state.epoch, micro_step * self.world_size + self.rank)
            loss, metrics = self.recipe.loss_step(batch, generator, self.state.step / max(self.total_steps, 1), stats)
            if not torch.isfinite(loss):
                kept = self.last_checkpoint or "none (no checkpoint was saved yet)"
                raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {self.state.step + 1}, epoch "
                                       f"{self.state.epoch + 1}; stopped; last good checkpoint: {kept}")  # fmt: skip
            (loss / accumulation).backward()
            stats.add(metrics)
            self.state.micro_step = micro_step + 1
            if self.state.micro_step % accumulation == 0 or self.state.micro_step == len(batches):
                self._optimizer_step(metrics, started)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                started = time.perf_counter()
                if self._done():
                    return  # a SIGTERM now changes nothing: the final save is no longer than a step's
                self._stop_if_asked()

    def _optimizer_step(self, metrics: dict[str, float], started: float) -> None:
        training = self.config.training
        warmup = training.lr_warmup_steps
        lr = training.learning_rate * min(1.0, (self.state.step + 1) / warmup) if warmup else training.learning_rate
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.world_size > 1:
            self._average_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.recipe.trainable_parameters(), training.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.recipe.after_optimizer_step()
        self.state.step += 1
        step_metrics = {**{f"step/{k}": v for k, v in metrics.items()}, "step/lr": lr,
                        "step/grad_norm": float(grad_norm), "step/step_time_s": time.perf_counter() - started,
                        "step/peak_memory_gib": _peak_memory_gib(self.device)}  # fmt: skip
        self.tracker.log_metrics(step_metrics, self.state.step)
        if self._saves_at(self.state.step):
            self._save_step()

    def _saves_at(self, step: int) -> bool:
        every = self.config.training.save_every_n_steps
        return bool(every) and step % every == 0

    def _stop_if_asked(self) -> None:
        """After an optimizer step: when a SIGTERM came (on any rank), save as ``--save_every_n_steps`` would
        and raise Stopped. Ranks decide together, or one would wait forever for the others' gradients."""
        asked = self.stop.signal
        if self.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([float(asked is not None)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = asked or ("SIGTERM" if flag.item() else None)
        if asked is None:
            return
        if not self._saves_at(self.state.step):
            self._save_step()
        raise Stopped(f"stopped by {asked} after step {self.state.step}; resume with --resume auto",
                      128 + signal.Signals[asked])  # fmt: skip

    def _average_gradients(self) -> None:
        """DDP's gradient mean, done by hand: the adapters live inside frozen DiTs, not in one wrapped module."""
        import torch.distributed as dist

        for param in self.recipe.trainable_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(self.world_size)

    def _save_step(self) -> None:
        stats_per_rank = self._gather(self.state.stats.state())  # every rank's partial epoch, for an exact resume
        if self.rank != 0:
            return
        step = self.state.step
        checkpoint = self.output_dir / f"{self.recipe.checkpoint_prefix}_step_{step}.safetensors"
        payload = {**self.state.to_json(), "epoch_stats_per_rank": stats_per_rank}
        with self._disk_errors(checkpoint):
            self.recipe.save(checkpoint)
            run_state.save_step(self.output_dir, step, checkpoint, self.optimizer, payload)
        self.last_checkpoint = checkpoint

    @contextlib.contextmanager
    def _disk_errors(self, path: Path) -> Iterator[None]:
        """A full disk while saving ends the run with one line naming it and the save to resume from."""
        try:
            yield
        except (OSError, SafetensorError, DiskFullError) as exc:
            reason = exc.reason if isinstance(exc, DiskFullError) else disk_full_reason(exc)
            if reason is None:
                raise
            kept = self.last_checkpoint or "none yet"
            raise UserError(f"{reason} while writing {path}; last complete save: {kept}; free space and rerun with "
                            "--resume auto") from None  # fmt: skip

    def _gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (``[value]`` in a single process)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def _end_epoch(self) -> None:
        summary = EpochStats.merge(self._gather(self.state.stats)).summary()  # all ranks' clips, same on each
        self.state.history.append({"epoch": self.state.epoch + 1, **summary})
        self.tracker.log_metrics({f"epoch/{k}": v for k, v in summary.items()}, self.state.step)
        if self.config.training.training_stage != "stage_a":
            reason = self._rank0_decision(self.state.early_stopping.check(summary))
            if reason is not None:
                self.state.stopped = reason
                if self.rank == 0:
                    print(f"early stopping after epoch {self.state.epoch + 1}: {reason}")
                self.tracker.set_tags({"early_stopping": reason})
        self.state.epoch += 1
        self.state.micro_step = 0
        self.state.stats = EpochStats()

    def _rank0_decision(self, reason: str | None) -> str | None:
        """Rank 0's early-stopping decision, on every rank. The merged statistics already agree; this guards the
        one thing that must never differ: ranks deciding apart would wait forever on each other's gradients."""
        if self.world_size == 1:
            return reason
        import torch.distributed as dist

        decision = [reason]
        dist.broadcast_object_list(decision, src=0)
        return decision[0]


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
