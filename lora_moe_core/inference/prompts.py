"""The videos one ``lora-moe infer`` command asks for: ``--prompt`` or a prompts file, checked up front.

Everything here runs before a model is loaded, so a typo in the 40th line of a prompts file fails in a second,
not after 28B parameters were read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lora_moe_core.errors import UserError
from lora_moe_core.guards.files import read_regular_bytes, refuse_clobber
from lora_moe_core.guards.parse import load_json
from lora_moe_core.guards.text import decode_utf8
from lora_moe_core.storage.store import resolve_under

#: Wan's own default negative prompt (Wan2.2 ``shared_config.py``); pass "" for none.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def negative_or_default(negative_prompt: str | None) -> str:
    """``None`` means Wan's own negative prompt; ``""`` means none."""
    return WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt


@dataclass
class Job:
    """One video to generate."""

    prompt: str
    output_path: Path
    instrument_hint: str | None = None
    seed: int = 0
    negative_prompt: str | None = WAN_NEGATIVE_PROMPT
    reference_video: str | None = None


_JSONL_KEYS = {"prompt": str, "instrument_hint": str, "seed": int, "output_path": str, "negative_prompt": str,
               "reference_video": str}  # fmt: skip


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt (keeps CJK, which is a word character)."""
    return re.sub(r"[^\w]+", "-", text.casefold()).strip("-_")[:limit].strip("-_") or "prompt"


def read_prompts_file(path: str | Path, output_dir: str | Path, template: Job) -> list[Job]:
    """Jobs of a ``.txt`` (a prompt a line; blank and ``#`` lines skipped) or ``.jsonl`` file (keys: see
    ``_JSONL_KEYS``; ``output_path`` relative to ``output_dir``; missing keys come from ``template``, the flags).
    Videos default to ``<output_dir>/<index>_<slug>.mp4``."""
    path = Path(path)
    lines = decode_utf8(read_regular_bytes(path, "prompts file"), f"prompts file {path}").splitlines()
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        entries.append(_jsonl_entry(path, number, line) if path.suffix == ".jsonl" else {"prompt": line.strip()})
    if not entries:
        raise UserError(f"prompts file {path} has no prompts")
    return jobs_from_entries(entries, output_dir, template, source=str(path))


def jobs_from_entries(entries: list[dict[str, Any]], output_dir: str | Path, template: Job,
                      where: str | None = None, source: str = "prompts") -> list[Job]:  # fmt: skip
    """Jobs of prompt entries (the keys of a ``.jsonl`` line); ``where`` names them in errors when not yet checked,
    ``source`` (the prompts file) when they were. An ``output_path`` must stay inside ``output_dir``."""
    if where is not None:
        if not entries:
            raise UserError(f"{where}: no prompts")
        entries = [_checked_entry(where, number, dict(entry)) for number, entry in enumerate(entries, start=1)]
    jobs = []
    for index, entry in enumerate(entries):
        name = entry.pop("output_path", f"{index:03d}_{slug(entry['prompt'])}.mp4")
        try:  # a prompts file may name its videos, but only inside --output_dir
            output = resolve_under(output_dir, name)
        except UserError as exc:
            raise UserError(f"{where or source}: entry {index + 1}: output_path {exc}") from None
        jobs.append(replace(template, output_path=output, **entry))
    return jobs


def _jsonl_entry(path: Path, number: int, line: str) -> dict[str, Any]:
    return _checked_entry(str(path), number, load_json(line, f"{path}:{number}"))


def _checked_entry(where: str, number: int, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise UserError(f'{where}:{number}: each line must be an object with a non-empty "prompt"')
    for key, value in entry.items():
        kind = _JSONL_KEYS.get(key)
        if kind is None:
            raise UserError(f'{where}:{number}: unknown key "{key}"; valid: {", ".join(_JSONL_KEYS)}')
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f'{where}:{number}: "{key}" must be a {kind.__name__}, got {value!r}')
    return entry


def plan_jobs(args: Any) -> list[Job]:
    """The videos an :class:`~lora_moe_core.inference.generate.InferenceRequest` asks for, checked before any model
    is loaded: ``prompt``, a ``prompts_file`` or a list of ``prompts`` entries (the keys of a ``.jsonl`` line)."""
    from lora_moe_core.data.dataset import check_caption
    from lora_moe_core.data.mp4 import check_writable
    from lora_moe_core.data.vocabulary import parse_instrument_hint
    from lora_moe_core.guards.numbers import check_int
    from lora_moe_core.guards.text import check_text
    from lora_moe_core.inference.request import MAX_SEED
    from lora_moe_core.model.sources import ModelSource

    if sum(source is not None for source in (args.prompt, args.prompts_file, args.prompts)) != 1:
        raise UserError("give exactly one of --prompt and --prompts_file")
    template = Job(args.prompt or "", Path(args.output_path), args.instrument_hint, args.seed,
                   negative_or_default(args.negative_prompt), args.reference_video)  # fmt: skip
    if args.prompts is not None:
        jobs = jobs_from_entries(list(args.prompts), args.output_dir, template, where="prompts")
    elif args.prompts_file is not None:
        jobs = read_prompts_file(args.prompts_file, args.output_dir, template)
    else:
        jobs = [template]
    outputs = [job.output_path.resolve() for job in jobs]
    written = [path for job in jobs for path in (job.output_path, job.output_path.with_suffix(".gates.json"))]
    model_files, model_folders = ModelSource.of(args).local_inputs()
    inputs = [args.lora_moe_weights, args.prompts_file, args.classifier_weights, *model_files,
              *(job.reference_video for job in jobs)]  # fmt: skip
    refuse_clobber(written, inputs, "infer", input_folders=model_folders)
    if len(set(outputs)) != len(outputs):
        raise UserError(f"two prompts write the same video {next(o for o in outputs if outputs.count(o) > 1)}")
    where = args.prompts_file or ("prompts" if args.prompts is not None else "--prompt")
    for job in jobs:
        check_caption(job.prompt, where)  # the captions' limits: no control codes, at most MAX_CAPTION_CHARS
        check_int("seed", job.seed, 0, MAX_SEED)
        if job.negative_prompt is not None:
            check_text(job.negative_prompt, where, "negative prompt")
        if job.instrument_hint is not None:
            parse_instrument_hint(job.instrument_hint)  # a typo fails now, not after loading 28B parameters
        if job.reference_video is not None and not Path(job.reference_video).is_file():
            raise UserError(f"reference video {job.reference_video} does not exist")
        check_writable(job.output_path)
        check_writable(job.output_path.with_suffix(".gates.json"))
    return jobs
