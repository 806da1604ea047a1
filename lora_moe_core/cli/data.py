"""Data commands of the CLI: ``synth-data``, ``label``, ``cache``, ``train-classifier``."""

from __future__ import annotations

import argparse

from lora_moe_core.errors import UserError


def _synth_data(args: argparse.Namespace) -> int:
    from lora_moe_core.data.synth import generate_dataset

    records = generate_dataset(args.output, args.num_videos, seed=args.seed, width=args.width, height=args.height,
                               num_frames=args.num_frames)  # fmt: skip
    print(f"wrote {len(records)} clips, {args.output}/manifest.jsonl and {args.output}/dataset.toml")
    return 0


def _label(args: argparse.Namespace) -> int:
    from lora_moe_core.data.dataset import load_dataset
    from lora_moe_core.data.labeling import label_records, write_labels
    from lora_moe_core.data.vocabulary import Vocabulary

    records, summary = label_records(load_dataset(args.dataset), Vocabulary.load(args.vocab))
    write_labels(records, args.output)
    print("\n".join(summary.lines()))
    print(f"wrote {args.output}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise argparse.ArgumentTypeError(f"expected i/n, got '{text}'")
    return int(index), int(count)


def _cache(args: argparse.Namespace) -> int:
    from lora_moe_core.cache.writer import CacheSettings, LatentCacher, import_musubi_cache, is_musubi_cache
    from lora_moe_core.data.dataset import load_dataset
    from lora_moe_core.data.labeling import label_records, read_labels
    from lora_moe_core.data.vocabulary import Vocabulary
    from lora_moe_core.model.loading import load_encoders
    from lora_moe_core.storage.store import Storage, is_s3

    storage = Storage()
    settings = CacheSettings(task=args.task, model=args.model, tip_weight=args.tip_weight,
                             roi_fallback=args.roi_fallback, latent_dtype=args.latent_dtype,
                             max_bad_fraction=args.max_bad_fraction)  # fmt: skip
    if is_musubi_cache(args.dataset, storage):
        report = import_musubi_cache(args.dataset, args.output, settings, storage)
        print(f"reused the musubi cache {args.dataset} without re-encoding: {report.clips} clips -> {args.output}")
        return 0
    dataset = load_dataset(args.dataset, storage)
    if args.target_frames or args.resolution:
        dataset.options.target_frames = args.target_frames or dataset.options.target_frames
        dataset.options.resolution = tuple(args.resolution or dataset.options.resolution)
        dataset.options.validate("--target_frames/--resolution")
    labels = read_labels(args.labels, storage) if args.labels else label_records(dataset, Vocabulary.from_builtin())[0]
    if len(labels) != len(dataset.clips):
        raise UserError(f"{args.labels} has {len(labels)} lines but the dataset has {len(dataset.clips)} clips")
    if is_s3(args.output):
        storage.list(args.output)  # a missing bucket or a denied key fails now, not once per encoded video
    cacher = LatentCacher(load_encoders(args.task, args.model), settings, args.output, storage)
    report = cacher.run(dataset, labels, args.shard)
    print(f"cached {report.clips} clips from {report.written} videos, {report.skipped} up to date, "
          f"{report.failed} failed -> {args.output}")  # fmt: skip
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from lora_moe_core.data.latent_cache import read_cache
    from lora_moe_core.model.classifier import save_classifier, train_classifier

    model, report = train_classifier(read_cache(args.cache), epochs=args.epochs,
                                     held_out_fraction=args.held_out_fraction, seed=args.seed)  # fmt: skip
    save_classifier(model, args.output, report)
    accuracy = "n/a" if report.held_out_accuracy is None else f"{report.held_out_accuracy:.3f}"
    print(f"trained on {report.train_clips} clips; held-out exact family-set accuracy {accuracy} "
          f"on {report.held_out_clips} clips -> {args.output}")  # fmt: skip
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
    synth.set_defaults(handler=_synth_data)

    label = commands.add_parser("label", help="label captions into Scissors/Hook/Suction/Other by keywords")
    label.add_argument("--dataset", required=True, help="dataset .toml, manifest .jsonl or folder (local or s3://)")
    label.add_argument("--output", required=True, help="labels.jsonl to write (local or s3://)")
    label.add_argument("--vocab", help='extra vocabulary TOML: [terms] Scissors = ["..."]')
    label.set_defaults(handler=_label)

    cache = commands.add_parser("cache", help="encode videos and captions into a musubi-compatible latent cache")
    cache.add_argument("--dataset", required=True, help="dataset .toml/.jsonl/folder, or a musubi cache folder")
    cache.add_argument("--labels", help="labels.jsonl from `lora-moe label` (default: label the captions now)")
    cache.add_argument("--task", choices=("tiny", "t2v-A14B"), default="t2v-A14B", help="model family")
    cache.add_argument("--model", help="diffusers-layout Wan2.2 folder, local or s3:// (required for t2v-A14B)")
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
    cache.set_defaults(handler=_cache)

    classifier = commands.add_parser("train-classifier", help="train the instrument classifier on cached latents")
    classifier.add_argument("--cache", required=True, help="latent cache folder or s3:// prefix")
    classifier.add_argument("--output", required=True, help="classifier .safetensors to write")
    classifier.add_argument("--epochs", type=int, default=60, help="passes over the training clips")
    classifier.add_argument("--held_out_fraction", type=float, default=0.2, help="clips held out for accuracy")
    classifier.add_argument("--seed", type=int, default=0, help="random seed")
    classifier.set_defaults(handler=_train_classifier)
