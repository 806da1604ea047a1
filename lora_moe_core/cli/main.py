"""The ``lora-moe`` command line (also ``python -m lora_moe_core``).

Every command validates its input up front; a user error prints one ``error:`` line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from lora_moe_core.cli.data import add_data_commands
from lora_moe_core.defaults import (
    ALPHA_BASE,
    ALPHA_EXPERT,
    DEFAULT_TASK,
    DTYPE_NAMES,
    EVAL_BATCH,
    EVAL_CLIPS,
    EVAL_TIMESTEPS,
    EXPERIMENT,
    LORA_FORMATS,
    REGISTERED_MODEL,
    REGISTRY_ALIAS,
    TASK_NAMES,
    torch_dtype,
)
from lora_moe_core.errors import EXIT_USER_ERROR, Stopped, UserError, disk_full_reason, one_line
from lora_moe_core.families import FAMILIES, family
from lora_moe_core.model.sources import add_model_flags

PLUGIN_GROUP = "lora_moe.commands"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # an unknown flag or a bad choice is quoted: escaped like every UserError message (no ANSI, one line)
        self.exit(EXIT_USER_ERROR, f"error: {one_line(message)} (see '{self.prog} --help')\n")


# -- config flags ---------------------------------------------------------------------------------------------
def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per config field; only flags given on the command line override."""
    from lora_moe_core.config import SECTIONS, flag_table

    parser.add_argument("--config", help="TOML config (seed layout); flags below override its values")
    for flag, (section, name) in flag_table().items():
        field = SECTIONS[section].model_fields[name]
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"[{section}] {field.description}"}
        kwargs.update(_flag_type(field.annotation))
        parser.add_argument(f"--{flag}", dest=f"cfg__{flag}", **kwargs)


def _flag_type(annotation: Any) -> dict[str, Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        if any(get_origin(arg) is list for arg in options):
            return {"type": _block_list_or_str, "metavar": "VALUE"}
        annotation = options[0]
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is Literal:
        return {"choices": list(get_args(annotation))}
    if get_origin(annotation) is list:
        return {"type": float, "nargs": "+"}
    return {"type": annotation}


def _block_list_or_str(value: str) -> str | list[int]:
    return [int(part) for part in value.split(",")] if value.replace(",", "").isdigit() and "," in value else value


def config_from_args(args: argparse.Namespace):
    """Build the validated config from ``--config`` and the config flags in ``args``."""
    from lora_moe_core.config import load_config

    overrides = {key[len("cfg__") :]: value for key, value in vars(args).items() if key.startswith("cfg__")}
    return load_config(args.config, overrides)


# -- commands ---------------------------------------------------------------------------------------------------
def _show_config(args: argparse.Namespace) -> int:
    from lora_moe_core.config import config_to_dict

    print(json.dumps(config_to_dict(config_from_args(args)), indent=2, ensure_ascii=False))
    return 0


def _convert_lora(args: argparse.Namespace) -> int:
    from lora_moe_core.formats.lora_files import convert_lora_file

    lora = convert_lora_file(args.input, args.to, args.output, torch_dtype(args.dtype) if args.dtype else None)
    ranks = sorted({module.rank for module in lora.modules.values()})
    print(f"{args.input} ({lora.format}, {len(lora.modules)} modules, ranks {ranks}) -> {args.output} ({args.to})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from lora_moe_core.adapters.checkpoint import load_network, read_checkpoint
    from lora_moe_core.adapters.export import export_instrument_lora
    from lora_moe_core.data.vocabulary import parse_instrument_hint
    from lora_moe_core.model.wan import task_linear_shapes

    families = parse_instrument_hint(args.instrument_hint)
    task = args.task or read_checkpoint(args.lora_moe_weights).config.model.task
    network = load_network(args.lora_moe_weights, task_linear_shapes(task))
    paths, gates = export_instrument_lora(
        network,
        families,
        args.output_dir,
        args.to,
        args.alpha_base,
        args.alpha_expert,
        torch_dtype(args.dtype),
        protect=[args.lora_moe_weights],
    )
    print("gates " + ", ".join(f"{name}={value:.3f}" for name, value in zip(FAMILIES, gates.tolist(), strict=True)))
    for path in paths:
        print(f"wrote {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from lora_moe_core.training.run import run_training

    run_training(config_from_args(args))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lora_moe_core.evaluation.run import EvaluationSettings, run_evaluation
    from lora_moe_core.model.sources import ModelSource

    settings = EvaluationSettings(task=args.task, lora_moe_weights=args.lora_moe_weights,
                                  base_lora_weights=args.base_lora_weights, cache=args.cache,
                                  output_dir=args.output_dir, model=ModelSource.of(args),
                                  classifier_weights=args.classifier_weights,
                                  samples_per_family=args.samples_per_family, sample_steps=args.sample_steps,
                                  sample_size=tuple(args.sample_size), seed=args.seed,
                                  matched_lora_weights=args.matched_lora_weights,
                                  eval_clips=args.eval_clips, eval_timesteps=tuple(args.eval_timesteps),
                                  eval_batch=args.eval_batch, device=args.device)  # fmt: skip
    metrics = run_evaluation(settings)
    for key in ("routing.accuracy", *(f"val_loss.{f}.stage2" for f in FAMILIES)):
        if key in metrics:
            print(f"{key} = {metrics[key]:.4f}")
    if "vs_matched_lora.all.difference" in metrics:
        from lora_moe_core.evaluation.arms import headline

        print(headline(metrics))
    print(f"wrote {args.output_dir}/metrics.json and {args.output_dir}/report.html")
    return 0


def _register(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.tracking.registry import register_checkpoint

    context = TrackingContext.from_env()
    context = replace(context, experiment=args.experiment) if args.experiment else context
    version = register_checkpoint(args.lora_moe_weights, args.name, args.work_dir, context=context, alias=args.alias)
    print(f"registered {args.name} version {version} (alias '{args.alias}')" if version else
          "MLflow tracking is off (MLFLOW_TRACKING_URI=none): nothing registered")  # fmt: skip
    return 0


def _infer(args: argparse.Namespace) -> int:
    from lora_moe_core.inference.generate import run_infer
    from lora_moe_core.inference.request import InferenceRequest

    run_infer(InferenceRequest.from_namespace(args))
    return 0


def _sync_tracking(args: argparse.Namespace) -> int:
    from lora_moe_core.redaction import redact
    from lora_moe_core.tracking.replay import replay_fallback

    reports = replay_fallback(args.file, args.tracking_uri)
    for run in reports:
        print(f"sent {run.calls} calls ({len(run.metric_steps)} metric steps, {run.refused} refused) to run "
              f"{run.run_id} at {redact(run.tracking_uri)}")  # fmt: skip
    print(f"{args.file}: nothing left to send" if not reports else f"{args.file}: all calls sent")
    return 0


def _train_node(args: argparse.Namespace) -> int:
    from lora_moe_core.training.node import run_node

    return run_node(args.config_uri, args.stage_uri, args.gpus_per_node, args.work_dir)


def _demo(args: argparse.Namespace) -> int:
    from lora_moe_core.cli.demo import run_demo

    run_demo(args.output_dir, seed=args.seed, num_videos=args.num_videos)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-moe", description="Instrument-aware LoRA-MoE training for WAN2.2")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    show = commands.add_parser("show-config", help="print the resolved config (file + flags) as JSON")
    add_config_flags(show)
    show.set_defaults(handler=_show_config)

    convert = commands.add_parser("convert-lora", help="convert a Wan LoRA between musubi, ComfyUI and diffusers keys")
    convert.add_argument("--input", required=True, help="LoRA .safetensors (format auto-detected)")
    convert.add_argument("--to", required=True, choices=LORA_FORMATS, help="output key layout")
    convert.add_argument("--output", required=True, help="output .safetensors path")
    convert.add_argument("--dtype", choices=DTYPE_NAMES, help="output dtype (default: the input's)")
    convert.set_defaults(handler=_convert_lora)

    export = commands.add_parser("export", help="write a standard LoRA equal to the LoRA-MoE for one instrument")
    export.add_argument("--lora_moe_weights", required=True, help="Stage-2 checkpoint (.safetensors)")
    export.add_argument("--instrument_hint", required=True, help=f"family or alias, e.g. {family('Hook').hint}")
    export.add_argument("--alpha_base", type=float, default=ALPHA_BASE,
                        help=f"base LoRA multiplier (default: the seed's {ALPHA_BASE}, as infer)")  # fmt: skip
    export.add_argument("--alpha_expert", type=float, default=ALPHA_EXPERT,
                        help=f"expert multiplier (default: the seed's {ALPHA_EXPERT}, as infer)")  # fmt: skip
    export.add_argument("--to", choices=LORA_FORMATS, default="comfy", help="key layout of the written files")
    export.add_argument("--output_dir", required=True, help="folder for the exported LoRA files")
    export.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                        help="stored dtype (default fp32; bf16 costs ~2e-3 relative error in ΔW)")  # fmt: skip
    export.add_argument("--task", choices=TASK_NAMES, help="model to validate against (default: stored)")
    export.set_defaults(handler=_export)

    add_data_commands(commands)

    train = commands.add_parser("train", help="train Stage 1 (stage_a), Stage 2 (stage_b) or Stage 3 (stage_c)")
    add_config_flags(train)
    train.set_defaults(handler=_train)

    node = commands.add_parser("train-node", help="one node of a multi-node Stage-2 TrainJob (torchrun, PET_* env)")
    node.add_argument("--config_uri", required=True, help="resolved config JSON the launcher wrote (s3:// or path)")
    node.add_argument("--stage_uri", required=True, help="where the saves live: read first, node 0 writes at the end")
    node.add_argument("--gpus_per_node", type=int, required=True, help="torchrun processes on this node")
    node.add_argument("--work_dir", default="/tmp/lora-moe-node", help="local folder for the config, inputs, saves")
    node.set_defaults(handler=_train_node)

    evaluate = commands.add_parser("evaluate", help="held-out metrics, routing report, samples, report.html")
    evaluate.add_argument("--task", choices=TASK_NAMES, default=DEFAULT_TASK, help="model family")
    add_model_flags(evaluate)
    evaluate.add_argument("--lora_moe_weights", required=True, help="Stage-2 checkpoint")
    evaluate.add_argument("--base_lora_weights", help="Stage-1 LoRA (any format), evaluated as 'stage1'")
    evaluate.add_argument("--matched_lora_weights",
                          help="matched single-LoRA arm (`lora-moe train --baseline_arm`): LoRA-MoE vs it per "
                          "family, with a bootstrap interval, at the top of report.html and in MLflow")  # fmt: skip
    evaluate.add_argument("--cache", required=True, help="held-out latent cache with labels (local or s3://)")
    evaluate.add_argument("--output_dir", required=True, help="folder for metrics.json, plots, report.html")
    evaluate.add_argument("--classifier_weights", help="instrument classifier (presence check, Fréchet features)")
    evaluate.add_argument("--samples_per_family", type=int, default=1, help="generated clips per family (0: none)")
    evaluate.add_argument("--sample_steps", type=int, default=8, help="denoising steps of the sample clips")
    evaluate.add_argument(
        "--sample_size",
        type=int,
        nargs=3,
        default=[64, 64, 17],
        metavar=("W", "H", "F"),
        help="sample clip width, height, frames",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="noise seed of the fixed (t, noise) pairs")
    evaluate.add_argument("--eval_clips", type=int, default=EVAL_CLIPS,
                          help="held-out clips scored, taken from each family in turn (0: all); at A14B size "
                               "each clip costs about 5 DiT forwards per timestep")  # fmt: skip
    evaluate.add_argument("--eval_timesteps", type=float, nargs="+", default=list(EVAL_TIMESTEPS), metavar="T",
                          help="timesteps in (0, 1] each clip is scored at (t >= 0.875: high-noise DiT)")  # fmt: skip
    evaluate.add_argument("--eval_batch", type=int, default=EVAL_BATCH,
                          help="samples per DiT forward (GPU memory grows with it)")  # fmt: skip
    evaluate.add_argument("--device", default="auto", help="auto (cuda when available, DiTs in bf16), cpu, cuda:N")
    evaluate.set_defaults(handler=_evaluate)

    register = commands.add_parser("register", help="register a Stage-2 checkpoint in the MLflow model registry")
    register.add_argument("--lora_moe_weights", required=True, help="Stage-2 checkpoint")
    register.add_argument("--name", default=REGISTERED_MODEL, help="registered model name")
    register.add_argument("--alias", default=REGISTRY_ALIAS, help="alias set on the new version")
    register.add_argument("--experiment", help=f"MLflow experiment of the registering run (default: {EXPERIMENT})")
    register.add_argument("--work_dir", required=True, help="folder for the packaged model")
    register.set_defaults(handler=_register)

    infer = commands.add_parser("infer", help="generate videos with a LoRA-MoE (routing: hint, prompt, classifier)")
    infer.add_argument("--lora_moe_weights", help="Stage-2/3 checkpoint (default: the base model)")
    infer.add_argument("--prompt", help="text prompt (or --prompts_file)")
    infer.add_argument("--prompts_file", help=".txt (one prompt a line) or .jsonl (prompt, instrument_hint, seed, ...)")
    infer.add_argument("--instrument_hint", help="route to these families, e.g. Hook/Electrocautery or Hook+Suction")
    infer.add_argument("--reference_video", help="mp4 the classifier routes by when hint and prompt name nothing")
    infer.add_argument("--classifier_weights", help="instrument classifier for --reference_video")
    infer.add_argument(
        "--alpha_base", type=float, default=ALPHA_BASE, help=f"base LoRA multiplier (seed: {ALPHA_BASE})"
    )
    infer.add_argument(
        "--alpha_expert", type=float, default=ALPHA_EXPERT, help=f"expert multiplier (seed: {ALPHA_EXPERT})"
    )
    infer.add_argument("--output_path", default="output.mp4", help="video of --prompt; gates in <stem>.gates.json")
    infer.add_argument("--output_dir", default="outputs/infer", help="folder of the --prompts_file videos")
    infer.add_argument("--task", choices=TASK_NAMES, help="model family (default: the checkpoint's)")
    add_model_flags(infer)
    infer.add_argument("--seed", type=int, default=0, help="noise seed")
    infer.add_argument("--num_inference_steps", type=int, default=40, help="UniPC steps")
    infer.add_argument("--guidance_scale", type=float, default=4.0, help="CFG scale of the high-noise DiT")
    infer.add_argument("--guidance_scale_2", type=float, default=3.0, help="CFG scale of the low-noise DiT")
    infer.add_argument("--flow_shift", type=float, default=12.0, help="UniPC flow shift (A14B T2V: 12)")
    infer.add_argument("--height", type=int, default=480, help="multiple of 16")
    infer.add_argument("--width", type=int, default=832, help="multiple of 16")
    infer.add_argument("--num_frames", type=int, default=81, help="4k+1 frames at 16 fps")
    infer.add_argument("--negative_prompt", default=None, help="default: Wan's own negative prompt; '' for none")
    infer.add_argument("--merge", action="store_true", help="fold the adapters into the DiT weights per route")
    infer.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    infer.add_argument("--dtype", choices=DTYPE_NAMES, help="DiT dtype (default: bf16 on cuda, fp32 on cpu)")
    infer.set_defaults(handler=_infer)

    demo = commands.add_parser("demo", help="tiny end-to-end demo on CPU (what `make run` runs)")
    demo.add_argument("--output_dir", default="outputs/demo", help="where the demo writes its files")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--num_videos", type=int, default=32, help="synthetic training clips (held-out: 8)")
    demo.set_defaults(handler=_demo)

    sync = commands.add_parser("sync-tracking", help="send to MLflow what a run logged while the server was down")
    sync.add_argument("file", help="tracking_fallback.jsonl of the run (in its output_dir)")
    sync.add_argument("--tracking_uri", help="MLflow server (default: the URI the run was logging to)")
    sync.set_defaults(handler=_sync_tracking)
    _add_plugin_commands(commands)
    return parser


def _add_plugin_commands(commands) -> None:
    """Add the commands other installed packages register under the ``lora_moe.commands`` entry-point group.

    The Kubeflow layer (``pipelines``) adds ``lora-moe pipeline`` this way, so the library never imports it.
    """
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        entry.load()(commands)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for any user error)."""
    args = build_parser().parse_args(argv)
    # MLflow announces database migrations at INFO on stderr (it configures its logger when imported, later):
    # keep stderr for our one-line errors and warnings unless the user asked for MLflow's INFO lines
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if (reason := disk_full_reason(exc)) is not None:  # a full disk in a writer with no handler of its own
            where = f" while writing {exc.filename2 or exc.filename}" if getattr(exc, "filename", None) else ""
            print(f"error: {one_line(reason + where)}; free space and rerun", file=sys.stderr)
            return EXIT_USER_ERROR
        from lora_moe_core.redaction import redact  # a bug: the traceback is for the report, never with a secret

        sys.stderr.write(redact(traceback.format_exc()))
        return 1


if __name__ == "__main__":
    sys.exit(main())
