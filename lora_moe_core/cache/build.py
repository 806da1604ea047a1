"""The cache step (``lora-moe cache``, the pipeline's cache-latents): reuse a musubi cache or encode a shard."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from lora_moe_core.cache.writer import CacheReport, CacheSettings
from lora_moe_core.data.dataset import Dataset
from lora_moe_core.errors import UserError
from lora_moe_core.guards.files import check_output_folder, refuse_clobber
from lora_moe_core.guards.owners import check_owned, owned_output
from lora_moe_core.model.sources import ModelSource
from lora_moe_core.storage.store import Storage


@dataclass
class CacheOutcome:
    """What one cache step did: the counts, and whether a musubi cache was reused as it was."""

    report: CacheReport
    reused_musubi: bool

    def line(self, source: str, output: str) -> str:
        report = self.report
        if self.reused_musubi:
            return f"reused the musubi cache {source} without re-encoding: {report.clips} clips -> {output}"
        return (f"cached {report.clips} clips from {report.written} videos, {report.skipped} up to date, "
                f"{report.failed} failed -> {output}")  # fmt: skip


def match_labels(labels: list[dict], dataset: Dataset, labels_uri: str) -> None:
    """Refuse labels written for other videos: line i must name clip i's ``video_path``, as ``lora-moe label``
    writes it (a count that happens to agree is not enough: the labels would train the wrong experts)."""
    for number, (label, clip) in enumerate(zip(labels, dataset.clips, strict=True), start=1):
        wanted = clip.fields.get("video_path")
        if label.get("video_path") != wanted:
            raise UserError(f"{labels_uri}:{number}: labels for {label.get('video_path')!r}, but clip {number} of the "
                            f"dataset is {wanted!r}: labels of another dataset? rerun `lora-moe label`")  # fmt: skip


def cache_dataset(
    dataset_uri: str,
    output: str,
    settings: CacheSettings,
    labels_uri: str | None = None,
    shard: tuple[int, int] = (0, 1),
    target_frames: Sequence[int] | None = None,
    resolution: tuple[int, int] | None = None,
    storage: Storage | None = None,
    overwrite: bool = False,
    device: str | None = None,
) -> CacheOutcome:
    """Encode every ``shard[1]``-th clip from ``shard[0]`` of a dataset into the latent cache at ``output``.

    A musubi cache folder as ``dataset_uri`` is imported without re-encoding. ``labels_uri`` is the step-1
    ``labels.jsonl`` (default: label the captions now); ``target_frames``/``resolution`` override the dataset's.
    A local ``output`` must be new, empty or a cache folder before, unless ``overwrite``; it may not hold (or be)
    an input. ``device``: where the VAE and UMT5 run (``auto``/None: the GPU when there is one, in bf16).

    Raises:
        UserError: labels for another dataset, an unreachable output bucket, too many undecodable videos.
    """
    from lora_moe_core.cache.writer import LatentCacher, import_musubi_cache, is_musubi_cache
    from lora_moe_core.data.dataset import load_dataset
    from lora_moe_core.data.labeling import label_records, read_labels
    from lora_moe_core.data.vocabulary import Vocabulary
    from lora_moe_core.model.devices import compute_dtype, resolve_device
    from lora_moe_core.model.loading import encoders_on, load_encoders
    from lora_moe_core.storage.store import is_s3

    storage = storage or Storage()
    model_files, model_folders = ModelSource.of(settings.model).local_inputs()
    if not is_s3(output):  # a file in its place or a read-only folder: refused before a model is loaded
        check_output_folder(output, "cache folder")
    if is_musubi_cache(dataset_uri, storage):
        refuse_clobber([], model_files, "cache", output_folders=[output], input_folders=[dataset_uri, *model_folders])
        with _output_folder(output, overwrite):
            report = import_musubi_cache(dataset_uri, output, settings, storage)
        return CacheOutcome(report, reused_musubi=True)
    dataset = load_dataset(dataset_uri, storage)
    refuse_clobber([], [*dataset.input_files(), labels_uri, *model_files], "cache", output_folders=[output],
                   input_folders=model_folders)  # fmt: skip
    if not is_s3(output):
        check_owned(output, "cache", overwrite)  # before the encoders load
    if target_frames or resolution:
        dataset.options.target_frames = list(target_frames or dataset.options.target_frames)
        dataset.options.resolution = tuple(resolution or dataset.options.resolution)
        dataset.options.validate("--target_frames/--resolution")
    if labels_uri:
        labels = read_labels(labels_uri, storage)
    else:
        labels = label_records(dataset, Vocabulary.from_builtin())[0]
    if len(labels) != len(dataset.clips):
        dropped = f" once {len(dataset.dropped)} duplicate entries are dropped" if dataset.dropped else ""
        raise UserError(f"{labels_uri} has {len(labels)} lines but the dataset has {len(dataset.clips)} clips"
                        f"{dropped}: rerun `lora-moe label`")  # fmt: skip
    if labels_uri:
        match_labels(labels, dataset, labels_uri)
    if is_s3(output):
        storage.list(output)  # a missing bucket or a denied key fails now, not once per encoded video
    target = resolve_device(device)  # a bad --device fails before the encoders load
    encoders = load_encoders(settings.task, settings.model, compute_dtype(target))  # a bf16 .pth: not copied
    encoders = encoders_on(encoders, target, copy=settings.task == "tiny")
    cacher = LatentCacher(encoders, settings, output, storage)
    with _output_folder(output, overwrite):
        return CacheOutcome(cacher.run(dataset, labels, shard), reused_musubi=False)


def _output_folder(output: str, overwrite: bool):
    """A local cache folder is the ``cache`` command's own (:mod:`~lora_moe_core.guards.owners`); a failed run that
    published nothing (every video bad) leaves no empty folder behind, one that published entries keeps them."""
    from lora_moe_core.storage.store import is_s3

    return contextlib.nullcontext() if is_s3(output) else owned_output(output, "cache", overwrite, keep_files=True)
