"""The ``lora-moe`` command line (also ``python -m lora_moe_core``).

Every command validates its input up front; a user error prints one ``error:`` line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from lora_moe_core.errors import EXIT_USER_ERROR, UserError

LORA_FORMATS = ("comfy", "diffusers", "musubi")
DTYPES = ("fp32", "bf16", "fp16")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {message} (see '{self.prog} --help')\n")


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


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# -- commands ---------------------------------------------------------------------------------------------------
def _show_config(args: argparse.Namespace) -> int:
    from lora_moe_core.config import config_to_dict

    print(json.dumps(config_to_dict(config_from_args(args)), indent=2, ensure_ascii=False))
    return 0


def _convert_lora(args: argparse.Namespace) -> int:
    from lora_moe_core.lora_formats import convert_lora_file

    lora = convert_lora_file(args.input, args.to, args.output, _dtype(args.dtype) if args.dtype else None)
    ranks = sorted({module.rank for module in lora.modules.values()})
    print(f"{args.input} ({lora.format}, {len(lora.modules)} modules, ranks {ranks}) -> {args.output} ({args.to})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from lora_moe_core.checkpoint import load_network, read_checkpoint
    from lora_moe_core.export import export_instrument_lora
    from lora_moe_core.families import FAMILIES
    from lora_moe_core.vocabulary import parse_instrument_hint
    from lora_moe_core.wan import task_linear_shapes

    families = parse_instrument_hint(args.instrument_hint)
    task = args.task or read_checkpoint(args.lora_moe_weights).config.model.task
    network = load_network(args.lora_moe_weights, task_linear_shapes(task))
    paths, gates = export_instrument_lora(
        network, families, args.output_dir, args.to, args.alpha_base, args.alpha_expert, _dtype(args.dtype)
    )
    print("gates " + ", ".join(f"{name}={value:.3f}" for name, value in zip(FAMILIES, gates.tolist(), strict=True)))
    for path in paths:
        print(f"wrote {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lora_moe_core.demo import run_demo

    run_demo(args.output_dir, seed=args.seed)
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
    convert.add_argument("--dtype", choices=DTYPES, help="output dtype (default: the input's)")
    convert.set_defaults(handler=_convert_lora)

    export = commands.add_parser("export", help="write a standard LoRA equal to the LoRA-MoE for one instrument")
    export.add_argument("--lora_moe_weights", required=True, help="Stage-2 checkpoint (.safetensors)")
    export.add_argument("--instrument_hint", required=True, help="family or alias, e.g. Hook/Electrocautery")
    export.add_argument("--alpha_base", type=float, default=None, help="base LoRA multiplier (default: trained 1.0)")
    export.add_argument("--alpha_expert", type=float, default=None, help="expert multiplier (default: trained 1.0)")
    export.add_argument("--to", choices=LORA_FORMATS, default="comfy", help="key layout of the written files")
    export.add_argument("--output_dir", required=True, help="folder for the exported LoRA files")
    export.add_argument("--dtype", choices=DTYPES, default="bf16", help="stored dtype (default bf16)")
    export.add_argument("--task", choices=("tiny", "t2v-A14B"), help="model to validate against (default: stored)")
    export.set_defaults(handler=_export)

    demo = commands.add_parser("demo", help="tiny end-to-end demo on CPU (what `make run` runs)")
    demo.add_argument("--output_dir", default="outputs/demo", help="where the demo writes its files")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for any user error)."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
