"""Data commands of the CLI: ``synth-data``, ``label``, ``cache``, ``train-classifier``."""

from __future__ import annotations

import argparse

from lora_moe_core.defaults import DEFAULT_TASK, TASK_NAMES
from lora_moe_core.model.sources import add_model_flags

OVERWRITE_HELP = ("write into a non-empty --output folder that this command did not write (default: refused, so "
                  "that a dataset or another command's output is never replaced)")  # fmt: skip


def _synth_data(args: argparse.Namespace) -> int:
    from lora_moe_core.data.synth import generate_dataset

    records = generate_dataset(args.output, args.num_videos, seed=args.seed, width=args.width, height=args.height,
                               num_frames=args.num_frames, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {len(records)} clips, {args.output}/manifest.jsonl and {args.output}/dataset.toml")
    return 0


def _label(args: argparse.Namespace) -> int:
    from lora_moe_core.data.labeling import label_dataset

    summary = label_dataset(args.dataset, args.output, args.vocab)
    print("\n".join(summary.lines()))
    print(f"wrote {args.output}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise argparse.ArgumentTypeError(f"expected i/n, got '{text}'")
    return int(index), int(count)


def _cache(args: argparse.Namespace) -> int:
    from lora_moe_core.cache.build import cache_dataset
    from lora_moe_core.cache.writer import CacheSettings
    from lora_moe_core.model.sources import ModelSource

    settings = CacheSettings(task=args.task, model=ModelSource.of(args), tip_weight=args.tip_weight,
                             roi_fallback=args.roi_fallback, latent_dtype=args.latent_dtype,
                             max_bad_fraction=args.max_bad_fraction)  # fmt: skip
    resolution = tuple(args.resolution) if args.resolution else None
    outcome = cache_dataset(args.dataset, args.output, settings, args.labels, args.shard, args.target_frames,
                            resolution, overwrite=args.overwrite, device=args.device)  # fmt: skip
    print(outcome.line(args.dataset, args.output))
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from lora_moe_core.data.latent_cache import read_cache
    from lora_moe_core.guards.files import refuse_clobber
    from lora_moe_core.model.classifier import save_classifier, train_classifier

    refuse_clobber([args.output], [], "train-classifier", input_folders=[args.cache])
    model, report = train_classifier(read_cache(args.cache), epochs=args.epochs,
                                     held_out_fraction=args.held_out_fraction, seed=args.seed)  # fmt: skip
    save_classifier(model, args.output, report)
    print(report.line(args.output))
    return 0


def add_data_commands(commands) -> None:
    """Register the data commands on the ``lora-moe`` sub-parser group."""
    synth = commands.add_parser("synth-data", help="write procedural surgical-like clips with captions and tip boxes")
    synth.add_argument("--output", required=True, help="dataset folder to write")
    synth.add_argument("--num_videos", type=int, default=16, help="number of clips")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    synth.add_argument("--width", type=int, default=128, help="frame width (multiple of 16)")
    synth.add_argument("--height", type=int, default=96, help="frame height (multiple of 16)")
    synth.add_argument("--num_frames", type=int, default=33, help="frames per clip (4k+1)")
    synth.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    synth.set_defaults(handler=_synth_data)

    label = commands.add_parser("label", help="label captions into Scissors/Hook/Suction/Other by keywords")
    label.add_argument("--dataset", required=True, help="dataset .toml, manifest .jsonl or folder (local or s3://)")
    label.add_argument("--output", required=True, help="labels.jsonl to write (local or s3://)")
    label.add_argument("--vocab", help='extra vocabulary TOML: [terms] Scissors = ["..."]')
    label.set_defaults(handler=_label)

    cache = commands.add_parser("cache", help="encode videos and captions into a musubi-compatible latent cache")
    cache.add_argument("--dataset", required=True, help="dataset .toml/.jsonl/folder, or a musubi cache folder")
    cache.add_argument("--labels", help="labels.jsonl from `lora-moe label` (default: label the captions now)")
    cache.add_argument("--task", choices=TASK_NAMES, default=DEFAULT_TASK, help="model family")
    add_model_flags(cache)
    cache.add_argument("--output", required=True, help="cache folder or s3:// prefix")
    cache.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: cache every n-th video from i (fan-out)")
    cache.add_argument("--tip_weight", type=float, default=4.0, help="ROI weight on tool-tip cells (seed: 3-5)")
    cache.add_argument(
        "--roi_fallback",
        choices=("motion", "uniform"),
        default="motion",
        help="ROI weights when a clip has no tip boxes: motion saliency or uniform",
    )
    cache.add_argument(
        "--latent_dtype", choices=("bfloat16", "float32"), default="bfloat16", help="stored dtype (musubi: bfloat16)"
    )
    cache.add_argument(
        "--max_bad_fraction",
        type=float,
        default=0.1,
        help="fail when more than this fraction of videos cannot be decoded",
    )
    cache.add_argument("--target_frames", type=int, nargs="+", help="override the dataset's target_frames (4k+1)")
    cache.add_argument("--resolution", type=int, nargs=2, metavar=("W", "H"), help="override the bucket resolution")
    cache.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    cache.add_argument("--device", default="auto", help="auto (cuda when available, bf16 encoders), cpu, cuda:N")
    cache.set_defaults(handler=_cache)

    classifier = commands.add_parser("train-classifier", help="train the instrument classifier on cached latents")
    classifier.add_argument("--cache", required=True, help="latent cache folder or s3:// prefix")
    classifier.add_argument("--output", required=True, help="classifier .safetensors to write")
    classifier.add_argument("--epochs", type=int, default=60, help="passes over the training clips")
    classifier.add_argument("--held_out_fraction", type=float, default=0.2, help="clips held out for accuracy")
    classifier.add_argument("--seed", type=int, default=0, help="random seed")
    classifier.set_defaults(handler=_train_classifier)
