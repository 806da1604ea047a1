"""``lora-moe infer`` on the tiny random Wan2.2 pair: routing priority, gates JSON, merge parity, batches, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lora_moe_core.adapters.checkpoint import save_checkpoint
from lora_moe_core.cli.main import main
from lora_moe_core.config import load_config
from lora_moe_core.data.mp4 import read_mp4, write_mp4
from lora_moe_core.errors import UserError
from lora_moe_core.inference.generate import InferenceSession, resolve_route
from lora_moe_core.model.wan import build_transformer
from tests.helpers import make_network, randomize_experts

SIZE = dict(height=64, width=64, num_frames=17, num_inference_steps=4)
SIZE_FLAGS = ["--task", "tiny", "--num_frames", "17", "--height", "64", "--width", "64", "--num_inference_steps", "4"]


def _save_network(path, transformer) -> str:
    network = make_network(load_config(None, {"task": "tiny"}), transformer)
    randomize_experts(network, std=1.0)
    with torch.no_grad():  # regimes that differ, so a merge into the wrong DiT would show
        network.timestep_gates.logits.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5]]))
    save_checkpoint(network, path)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's ops are too small to split: two OpenMP threads only spin-wait, 5x slower on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return _save_network(tmp_path_factory.mktemp("ckpt") / "lora_moe.safetensors", build_transformer("tiny"))


@pytest.fixture(scope="module")
def session(checkpoint) -> InferenceSession:
    return InferenceSession("tiny", lora_moe_weights=checkpoint, alpha_base=0.7, alpha_expert=1.0, device="cpu")


def test_infer_writes_video_and_gates(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "videos" / "X.mp4"  # missing parent folder: created
    argv = ["infer", "--lora_moe_weights", checkpoint, "--prompt", "电凝钩切割组织", "--instrument_hint",
            "Hook/Electrocautery", "--output_path", str(out), *SIZE_FLAGS]  # fmt: skip
    assert main(argv) == 0
    assert read_mp4(out).shape == (17, 64, 64, 3)
    report = json.loads(out.with_suffix(".gates.json").read_text(encoding="utf-8"))
    logits = {"Scissors": 0.0, "Hook": 5.0, "Suction": 0.0, "Other": 0.0}
    assert report["route"] == {"source": "hint", "families": ["Hook"], "instrument_logits": logits}
    assert max(report["gates"], key=report["gates"].get) == "Hook"
    assert report["steps_per_expert"]["high_noise"] > 0 and report["steps_per_expert"]["low_noise"] > 0
    assert report["timestep_gates"]["high_noise"]["Hook"] == pytest.approx(2 * torch.sigmoid(torch.tensor(1.0)).item())
    assert (report["alpha_base"], report["alpha_expert"], report["seed"], report["num_frames"]) == (0.7, 1.0, 0, 17)
    assert "Hook=1.000" in capsys.readouterr().out


def test_routing_priority(session) -> None:
    hinted = session.route("用剪刀剪断组织", instrument_hint="Hook/Electrocautery")
    assert (hinted.source, hinted.families, int(hinted.gates.argmax())) == ("hint", ["Hook"], 1)
    prompted = session.route("用剪刀剪断组织")
    assert (prompted.source, prompted.families, int(prompted.gates.argmax())) == ("prompt", ["Scissors"], 0)
    nothing = session.route("tissue view")
    assert (nothing.source, nothing.families) == ("uniform", [])
    assert torch.allclose(nothing.gates, torch.full((4,), 0.25))
    none = session.route("用剪刀剪断组织", instrument_hint="none")  # explicit "no instrument" beats the prompt
    assert (none.source, none.families) == ("hint", [])
    classified = resolve_route("tissue view", classify=lambda: torch.tensor([-2.0, -1.0, 3.0, 0.5]))
    assert (classified.source, classified.families) == ("classifier", ["Suction", "Other"])
    assert resolve_route("suction", classify=lambda: 1 / 0).source == "prompt"  # the classifier runs only if needed


def test_classifier_routes_by_reference_video(checkpoint, tmp_path) -> None:
    from lora_moe_core.model.classifier import ClassifierReport, InstrumentClassifier, save_classifier

    report = ClassifierReport(0, 0, None, {})
    weights = save_classifier(InstrumentClassifier(width=8), tmp_path / "clf.safetensors", report)
    video = write_mp4(np.random.default_rng(0).integers(0, 255, (9, 32, 48, 3), dtype=np.uint8), tmp_path / "ref.mp4")
    session = InferenceSession("tiny", lora_moe_weights=checkpoint, classifier_weights=str(weights), device="cpu")
    route = session.route("tissue view", reference_video=str(video), height=64, width=64, num_frames=17)
    assert route.source == "classifier" and route.logits.shape == (4,)
    assert torch.isclose(route.gates.sum(), torch.tensor(1.0))
    assert session.route("hook", reference_video=str(video)).source == "prompt"


def test_lora_changes_output_and_merge_matches(checkpoint, session) -> None:
    hook = session.route("hook")
    lora = session.generate("hook", hook, seed=3, as_float=True, **SIZE)
    base = InferenceSession("tiny", device="cpu").generate("hook", seed=3, as_float=True, **SIZE)
    assert np.abs(lora - base).max() > 1e-2
    with InferenceSession("tiny", lora_moe_weights=checkpoint, alpha_base=0.7, merge=True, device="cpu") as merged:
        assert np.abs(merged.generate("hook", seed=3, as_float=True, **SIZE) - lora).max() < 1e-4
        # a new route unmerges the old one first
        suction = session.generate("suction", seed=3, as_float=True, **SIZE)
        assert np.abs(merged.generate("suction", seed=3, as_float=True, **SIZE) - suction).max() < 1e-4
        weight = merged.dits["high"].blocks[3].attn1.to_q.base_layer.weight.clone()
    assert not torch.equal(weight, merged.dits["high"].blocks[3].attn1.to_q.base_layer.weight)  # closed: unmerged


def test_prompts_files(checkpoint, tmp_path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("电凝钩切割组织\n\n# a comment\nsuction of blood\n", encoding="utf-8")
    assert main(["infer", "--lora_moe_weights", checkpoint, "--prompts_file", str(text),
                 "--output_dir", str(tmp_path / "txt"), *SIZE_FLAGS]) == 0  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "txt").glob("*.mp4"))
    assert names == ["000_电凝钩切割组织.mp4", "001_suction-of-blood.mp4"]
    lines = [{"prompt": "tissue", "instrument_hint": "Suction", "seed": 5, "output_path": "a/first.mp4"},
             {"prompt": "grasper holds the gallbladder"}]  # fmt: skip
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    assert main(["infer", "--lora_moe_weights", checkpoint, "--prompts_file", str(jsonl),
                 "--output_dir", str(tmp_path / "jsonl"), *SIZE_FLAGS]) == 0  # fmt: skip
    first = json.loads((tmp_path / "jsonl" / "a" / "first.gates.json").read_text(encoding="utf-8"))
    assert (first["route"]["source"], first["route"]["families"], first["seed"]) == ("hint", ["Suction"], 5)
    second = json.loads((tmp_path / "jsonl" / "001_grasper-holds-the-gallbladder.gates.json").read_text())
    assert (second["route"]["source"], second["route"]["families"]) == ("prompt", ["Other"])
    assert read_mp4(tmp_path / "jsonl" / "a" / "first.mp4").shape == (17, 64, 64, 3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--instrument_hint", "Banana"], "unknown instrument hint 'Banana'"),
        (["--num_frames", "20"], "num_frames must be 4k+1"),
        (["--height", "70"], "height must be a multiple of 16"),
        (["--guidance_scale", "1", "--guidance_scale_2", "3"], "needs guidance_scale > 1"),
        (["--output_path", "{tmp}/file.txt/out.mp4"], "cannot write"),
        (["--output_path", "{tmp}"], "is a directory"),
        (["--prompts_file", "{tmp}/file.txt"], "exactly one of --prompt and --prompts_file"),
        (["--reference_video", "{tmp}/file.txt"], "needs --classifier_weights"),
    ],
)
def test_bad_input_is_one_line(checkpoint, tmp_path, capsys, extra, message) -> None:
    (tmp_path / "file.txt").write_text("x")
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    argv = ["infer", "--lora_moe_weights", checkpoint, "--prompt", "hook", "--output_path", str(tmp_path / "o.mp4")]
    assert main([*argv, *SIZE_FLAGS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    if "Banana" in message:
        assert all(family in err for family in ("Scissors", "Hook", "Suction", "Other"))
    assert not (tmp_path / "o.mp4").exists()


def test_checkpoint_for_another_model_size(tmp_path, capsys) -> None:
    from diffusers import WanTransformer3DModel

    from lora_moe_core.model.wan import TASKS

    wider = WanTransformer3DModel(**{**TASKS["tiny"].transformer_config, "attention_head_dim": 16})
    other = _save_network(tmp_path / "other.safetensors", wider)
    argv = ["infer", "--lora_moe_weights", other, "--prompt", "hook", "--output_path", str(tmp_path / "o.mp4")]
    assert main([*argv, *SIZE_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another model size" in err, err


def test_mp4_round_trip_and_errors(tmp_path) -> None:
    frames = np.zeros((5, 32, 48, 3), dtype=np.uint8)
    frames[:, :, :24] = 200
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=16)
    decoded = read_mp4(path)
    assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).mean() < 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temp file left
    with pytest.raises(UserError, match="is a directory"):
        write_mp4(frames, tmp_path)
    with pytest.raises(ValueError, match="even"):
        write_mp4(np.zeros((1, 33, 48, 3), dtype=np.uint8), tmp_path / "odd.mp4")
