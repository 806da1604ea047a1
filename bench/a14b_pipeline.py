"""The pipeline at WAN2.2-A14B scale on one GPU, through the library functions the components call (issue 21).

    python bench/a14b_pipeline.py --size a14b --json bench/results_a14b_pipeline_h100.json   # on the GPU
    python bench/a14b_pipeline.py --size tiny --json /tmp/tiny.json                           # the same stages, CPU

Stages, each in its own worker process (its peak host RSS is its own): ``files`` (random weights in the original
Wan single-file layouts, bench/a14b_files.py) beside ``clips`` (synthetic clips with captions, training and
held-out), ``cache`` (VAE + UMT5 at the clip size, ``cache_dataset``), ``train_fast`` (stage_b, both DiTs
resident; ``--fast_flags`` adds e.g. ``compile_blocks``), ``train_lowmem`` (``--offload_inactive_dit --fp8_base
--blocks_to_swap 20``, SIGKILLed once its first step is saved) and ``resume`` (the same with ``--resume auto``, to
the last step), ``evaluate`` (a small held-out budget), ``infer`` (one video, 40 steps, CFG) and ``export``.
Per stage: wall time, each file's load time, the time to place the DiTs, step times, peak GPU memory, peak host
RSS. The JSON is rewritten after every stage, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

STAGES = ("files", "clips", "cache", "train_fast", "train_lowmem", "resume", "evaluate", "infer", "export")


@dataclass
class Plan:
    """What a run does; written as JSON for the workers."""

    size: str
    work: str
    task: str
    clip_size: tuple[int, int, int]  # width, height, frames the VAE encodes
    render_size: tuple[int, int, int]  # the synthetic clips as drawn (the cache resizes them to clip_size)
    clips: int = 4  # training clips; as many held out
    steps: int = 3
    blocks_to_swap: int = 20
    fast_flags: dict = field(default_factory=dict)
    eval_clips: int = 4
    eval_timesteps: tuple[float, ...] = (0.6, 0.9)
    sample_size: tuple[int, int, int] = (64, 64, 17)
    sample_steps: int = 8
    infer_size: tuple[int, int, int] = (832, 480, 81)
    infer_steps: int = 40
    files: dict = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return Path(self.work).joinpath(*parts)


SIZES = {
    "a14b": dict(task="t2v-A14B", clip_size=(832, 480, 81), render_size=(416, 240, 81)),
    "tiny": dict(task="tiny", clip_size=(64, 48, 17), render_size=(64, 48, 17), blocks_to_swap=2,
                 sample_size=(32, 32, 9), sample_steps=2, infer_size=(64, 48, 17)),
}  # fmt: skip


# -- measuring inside a worker ------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


class Probe:
    """Wall clock, events (a file loaded, the DiTs placed, a step) with the host RSS at each, and the peaks."""

    def __init__(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := now: the imports do not count
        self.start, self.events, self.steps = time.perf_counter(), [], []

    def mark(self, name: str, seconds: float, **extra) -> None:
        self.events.append({"event": name, "seconds": round(seconds, 3), "rss_gib": _gib(_status_kib("VmRSS")),
                            **extra})  # fmt: skip
        print(f"  {name}: {seconds:.2f} s, host RSS {self.events[-1]['rss_gib']:.2f} GiB", flush=True)

    def result(self) -> dict:
        import torch

        out = {"worker_wall_s": round(time.perf_counter() - self.start, 3), "peak_rss_gib": _gib(_status_kib("VmHWM")),
               "events": self.events, "step_times_s": self.steps}  # fmt: skip
        if torch.cuda.is_available():
            out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            out["device"] = torch.cuda.get_device_name()
        return out


def _gib(kib: int) -> float:
    return round(kib / 2**20, 2)


def _timed(module, name: str, probe: Probe, label) -> None:
    """Wrap ``module.name`` so that each call is a probe event (the library imports these at call time)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        probe.mark(label(*args, **kwargs), time.perf_counter() - start)
        return result

    setattr(module, name, wrapper)


def instrument(probe: Probe) -> None:
    """File loads, DiT placement and optimizer steps become probe events (tracking itself is off)."""
    from lora_moe_core.model import loading, single_file
    from lora_moe_core.tracking import tracker
    from lora_moe_core.training import run

    _timed(single_file, "load_dit_file", probe, lambda uri, flag, *a, **k: f"load --{flag}")
    _timed(single_file, "load_vae_file", probe, lambda *a, **k: "load --vae")
    _timed(single_file, "load_t5_file", probe, lambda *a, **k: "load --t5")
    _timed(loading, "load_dits", probe, lambda *a, **k: "load_dits (both)")
    _timed(run, "prepare_recipe", probe, lambda *a, **k: "place DiTs + adapters (prepare_recipe)")

    class StepRecorder(tracker.NullTracker):
        def log_metrics(self, metrics, step):
            if "step/step_time_s" in metrics:
                probe.steps.append(round(metrics["step/step_time_s"], 3))

    tracker.start_tracker = lambda *a, **k: StepRecorder()


# -- the stages (in workers) ----------------------------------------------------------------------------------------
def _source(plan: Plan, with_encoders: bool = True):
    from lora_moe_core.model.sources import ModelSource

    files = plan.files
    encoders = {"vae": files["vae"], "t5": files["t5"]} if with_encoders else {}
    return ModelSource(model=files["model"], dit=files["dit"], dit_high_noise=files["dit_high_noise"], **encoders)


def stage_files(plan: Plan, probe: Probe) -> dict:
    import torch
    from a14b_files import write_files

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files, seconds = write_files(plan.path("files"), plan.task, device)
    for what, value in seconds.items():
        probe.mark(f"write {what}", value)
    sizes = {flag: os.path.getsize(path) for flag, path in files.items() if flag != "model"}
    return {"files": files, "bytes": sizes}


def stage_clips(plan: Plan, probe: Probe) -> dict:
    from a14b_files import write_clips

    for name, seed in (("train", 0), ("heldout", 1)):
        start = time.perf_counter()
        write_clips(plan.path("clips", name), plan.clips, seed, plan.render_size)
        probe.mark(f"synth-data {name} ({plan.clips} clips)", time.perf_counter() - start)
    return {}


def stage_cache(plan: Plan, probe: Probe) -> dict:
    from lora_moe_core.cache.build import cache_dataset
    from lora_moe_core.cache.writer import CacheSettings

    settings = CacheSettings(task=plan.task, model=_source(plan))
    width, height, frames = plan.clip_size
    out = {}
    for name in ("train", "heldout"):
        start = time.perf_counter()
        outcome = cache_dataset(str(plan.path("clips", name)), str(plan.path("cache", name)), settings,
                                target_frames=[frames], resolution=(width, height))  # fmt: skip
        probe.mark(f"cache {name}", time.perf_counter() - start, clips=outcome.report.clips)
        out[name] = outcome.report.clips
    return {"clips_cached": out}


def _train_config(plan: Plan, name: str, flags: dict):
    from train_step import random_stage1

    from lora_moe_core.config import load_config
    from lora_moe_core.model.wan import linear_shapes

    config_file = BENCH.parent / "configs" / "lora_moe_stage_b_merged.toml"
    stage1 = plan.path("stage1.safetensors")
    base = load_config(str(config_file), {"task": plan.task})
    if not stage1.exists():
        random_stage1(plan.task, linear_shapes(_meta_dit(plan.task)), base, plan.path())
    overrides = {"task": plan.task, "cache": str(plan.path("cache", "train")), "base_lora_weights": str(stage1),
                 "output_dir": str(plan.path("runs", name)), "max_train_steps": plan.steps, "num_train_epochs": 10,
                 "gradient_accumulation_steps": 1, **_source(plan, False).overrides(), **flags}  # fmt: skip
    return load_config(str(config_file), overrides)


def _meta_dit(task: str):
    import torch
    from diffusers import WanTransformer3DModel

    from lora_moe_core.model.wan import get_task

    with torch.device("meta"):
        return WanTransformer3DModel(**get_task(task).transformer_config)


def _lowmem_flags(plan: Plan) -> dict:
    return {"offload_inactive_dit": True, "fp8_base": True, "blocks_to_swap": plan.blocks_to_swap,
            "save_every_n_steps": 1}  # fmt: skip


def stage_train(plan: Plan, probe: Probe, name: str) -> dict:
    from lora_moe_core.training.run import run_training

    flags = {"train_fast": plan.fast_flags, "train_lowmem": _lowmem_flags(plan),
             "resume": {**_lowmem_flags(plan), "resume": "auto"}}[name]  # fmt: skip
    config = _train_config(plan, "train_lowmem" if name == "resume" else name, flags)
    if name == "train_lowmem":
        _hold_after_first_save()
    final = run_training(config)
    return {"flags": flags, "final": str(final)}


def _hold_after_first_save() -> None:
    """The killed run waits after its first save for the SIGKILL, so that the kill lands between two steps even
    where steps take milliseconds (tiny); at A14B size the parent's poll is far faster than a step anyway."""
    from lora_moe_core.training import loop

    save = loop.TrainingLoop._save_step

    def save_then_wait(self):
        save(self)
        if self.state.step == 1:
            time.sleep(600)

    loop.TrainingLoop._save_step = save_then_wait


def stage_evaluate(plan: Plan, probe: Probe) -> dict:
    from lora_moe_core.evaluation.run import EvaluationSettings, run_evaluation

    settings = EvaluationSettings(task=plan.task, lora_moe_weights=str(plan.path("runs", "train_fast", FINAL)),
                                  base_lora_weights=str(plan.path("stage1.safetensors")),
                                  cache=str(plan.path("cache", "heldout")), output_dir=str(plan.path("evaluate")),
                                  model=_source(plan), samples_per_family=1, sample_steps=plan.sample_steps,
                                  sample_size=plan.sample_size, eval_clips=plan.eval_clips,
                                  eval_timesteps=plan.eval_timesteps)  # fmt: skip
    metrics = run_evaluation(settings)
    keys = ("evaluation.clips", "evaluation.held_out_clips", "evaluation.timesteps", "evaluation.samples",
            "val_loss.all.stage2", "specialisation.score")  # fmt: skip
    return {"metrics": {key: metrics[key] for key in keys if key in metrics}}


def stage_infer(plan: Plan, probe: Probe) -> dict:
    from lora_moe_core.inference.generate import run_infer
    from lora_moe_core.inference.request import InferenceRequest

    width, height, frames = plan.infer_size
    request = InferenceRequest(prompts=[{"prompt": "电凝钩切割组织, laparoscopic view", "instrument_hint": "Hook"}],
                               lora_moe_weights=str(plan.path("runs", "train_fast", FINAL)), task=plan.task,
                               **_source(plan).overrides(), output_dir=str(plan.path("infer")), width=width,
                               height=height, num_frames=frames, num_inference_steps=plan.infer_steps)  # fmt: skip
    written = run_infer(request)
    report = json.loads(written[0].with_suffix(".gates.json").read_text())
    return {"video_bytes": written[0].stat().st_size, "generate_s": report["seconds"],
            "steps_per_expert": report["steps_per_expert"], "guidance": [request.guidance_scale,
                                                                         request.guidance_scale_2]}  # fmt: skip


def stage_export(plan: Plan, probe: Probe) -> dict:
    from lora_moe_core.adapters.export import export_family_loras

    written = export_family_loras(plan.path("runs", "train_fast", FINAL), plan.path("export"), "comfy")
    return {"files": sorted(path.name for path in written)}


FINAL = "lora_moe_final.safetensors"
WORKERS = {"files": stage_files, "clips": stage_clips, "cache": stage_cache, "evaluate": stage_evaluate,
           "infer": stage_infer, "export": stage_export}  # fmt: skip


def run_worker(stage: str, plan_file: str, result_file: str) -> int:
    plan = Plan(**json.loads(Path(plan_file).read_text()))
    started = time.perf_counter()
    import accelerate  # noqa: F401  (imported now, so that no load time below includes imports)
    import diffusers.loaders.single_file_utils  # noqa: F401
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401

    imports = time.perf_counter() - started
    probe = Probe()
    probe.mark("imports (before the probe)", imports)
    instrument(probe)
    function = WORKERS.get(stage) or (lambda plan, probe: stage_train(plan, probe, stage))
    outcome = function(plan, probe)
    Path(result_file).write_text(json.dumps({**outcome, **probe.result()}, indent=2))
    return 0


# -- the orchestrator --------------------------------------------------------------------------------------------
def _spawn(stage: str, plan_file: Path, results: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": "none", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", stage, "--plan", str(plan_file),
               "--result", str(results / f"{stage}.json")]  # fmt: skip
    return subprocess.Popen(command, env=env)


def _wait(process: subprocess.Popen, stage: str, results: Path, started: float, killed: bool = False) -> dict:
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    record = {"wall_s": round(time.perf_counter() - started, 3), "exit_code": process.returncode,
              "peak_rss_gib_wait4": round(usage.ru_maxrss / 2**20, 2)}  # fmt: skip
    if (results / f"{stage}.json").exists():
        record.update(json.loads((results / f"{stage}.json").read_text()))
    elif not killed:
        raise SystemExit(f"error: stage {stage} failed (exit code {process.returncode})")
    return record


def _kill_after_first_save(process: subprocess.Popen, plan: Plan) -> float:
    """SIGKILL the low-memory run once its first step is saved (the marker is the last file of a save)."""
    marker = plan.path("runs", "train_lowmem", "training_state_step_1.json")
    started = time.perf_counter()
    while not marker.exists():
        if process.poll() is not None:
            return time.perf_counter() - started
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    return time.perf_counter() - started


def run_stages(plan: Plan, stages: list[str], out: Path, meta: dict) -> dict:
    results_dir = plan.path("results")
    results_dir.mkdir(parents=True, exist_ok=True)
    plan_file = plan.path("plan.json")
    report = {**meta, "plan": asdict(plan), "stages": {}}
    if out.exists():  # a second call on the same machine adds its stages to the first one's
        report["stages"] = json.loads(out.read_text()).get("stages", {})
    for stage in stages:
        plan_file.write_text(json.dumps(asdict(plan)))
        print(f"== {stage}", flush=True)
        started = time.perf_counter()
        if stage == "files":  # the clips are drawn on the CPU while the weights are written
            clips = _spawn("clips", plan_file, results_dir)
            report["stages"]["files"] = _wait(_spawn("files", plan_file, results_dir), "files", results_dir, started)
            report["stages"]["clips"] = _wait(clips, "clips", results_dir, started)
            plan.files = report["stages"]["files"]["files"]
        elif stage == "clips":
            continue
        elif stage == "train_lowmem":
            process = _spawn(stage, plan_file, results_dir)
            kill_s = _kill_after_first_save(process, plan)
            report["stages"][stage] = {**_wait(process, stage, results_dir, started, killed=True),
                                       "killed_after_s": round(kill_s, 3)}  # fmt: skip
        else:
            report["stages"][stage] = _wait(_spawn(stage, plan_file, results_dir), stage, results_dir, started)
        print(f"== {stage}: {time.perf_counter() - started:.1f} s", flush=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def _card() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", "cpu"
    name = torch.cuda.get_device_name()
    return name, next((tag for tag in ("h200", "h100") if tag in name.lower()), "gpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="a14b")
    parser.add_argument("--work", default="/tmp/a14b_pipeline", help="folder for the files, caches and runs")
    parser.add_argument("--stages", default=",".join(s for s in STAGES if s != "clips"), help="comma-separated")
    parser.add_argument("--json", help="results file (default bench/results_a14b_pipeline_<card>.json)")
    parser.add_argument("--steps", type=int, help="optimizer steps of each training run")
    parser.add_argument("--infer_steps", type=int)
    parser.add_argument("--fast_flags", default="{}", help='train_fast config overrides, e.g. {"compile_blocks": true}')
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.plan, args.result)
    plan = Plan(size=args.size, work=args.work, **SIZES[args.size], fast_flags=json.loads(args.fast_flags))
    plan.steps = args.steps or plan.steps
    plan.infer_steps = args.infer_steps or plan.infer_steps
    previous = plan.path("plan.json")
    if previous.exists():  # the files of an earlier call on this machine
        plan.files = json.loads(previous.read_text()).get("files", {})
    card, tag = _card()
    out = Path(args.json or BENCH / f"results_a14b_pipeline_{tag}.json")
    meta = {"card": card, "command": "python bench/a14b_pipeline.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    report = run_stages(plan, [s for s in args.stages.split(",") if s], out, meta)
    for stage, record in report["stages"].items():
        rss = record.get("peak_rss_gib", record["peak_rss_gib_wait4"])
        print(f"{stage:13s} {record['wall_s']:8.1f} s  peak RSS {rss} GiB  "
              f"peak GPU {record.get('peak_gpu_gib', '-')} GiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
