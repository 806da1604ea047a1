"""ROI weight maps and the tiny model components (deterministic, saved/loaded through the real loaders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_moe_core.cache import roi
from lora_moe_core.errors import UserError
from lora_moe_core.model.loading import (
    build_tiny_tokenizer,
    encode_prompts,
    encode_video,
    load_encoders,
    save_tiny_model,
)


def test_latent_frame_groups_follow_the_wan_vae():
    groups = roi.latent_frame_groups(17)
    assert [list(g) for g in groups[:3]] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]] and len(groups) == 5


def test_box_weights_mark_touched_cells_of_the_right_latent_frame():
    boxes = [[] for _ in range(9)]
    boxes[0] = [[0, 0, 8, 8]]  # latent frame 0, cell (0, 0)
    boxes[6] = [[20, 9, 30, 15]]  # latent frame 2 (pixel frames 5-8), cells x 2..3, y 1
    weights = roi.box_weights(boxes, (32, 24), tip_weight=4.0)
    assert weights.shape == (3, 3, 4)
    expected = torch.ones(3, 3, 4)
    expected[0, 0, 0] = 4.0
    expected[2, 1, 2:4] = 4.0
    torch.testing.assert_close(weights, expected)


def test_transform_boxes_maps_resize_and_crop_and_clamps():
    mapped = roi.transform_boxes([[[10, 10, 20, 20], [0, 0, 2, 2]]], scale=2.0, offset=(8, 0), size=(32, 32))
    assert mapped == [[[12.0, 20.0, 32.0, 32.0]]]  # second box falls outside the crop


def test_motion_weights_peak_where_things_move():
    clip = np.zeros((9, 16, 16, 3), dtype=np.uint8)
    for t in range(9):
        clip[t, 8:16, (t % 2) * 8 : (t % 2) * 8 + 8] = 255  # a blinking square in the lower half
    weights = roi.motion_weights(clip, tip_weight=5.0)
    assert weights.shape == (3, 2, 2)
    assert weights.max().item() == pytest.approx(5.0) and weights[:, 0].eq(1).all()


def test_tiny_tokenizer_is_the_same_every_build():
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    text = "电凝钩在胆囊三角区分离组织 a grasper and scissors 吸引器"
    assert first(text).input_ids == second(text).input_ids
    assert first.get_vocab() == second.get_vocab()
    assert first.unk_token_id not in first("电凝钩 吸引器 抓钳").input_ids


def test_saved_tiny_folder_loads_through_the_real_loader(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny-wan")
    assert (folder / "model_index.json").is_file() and (folder / "transformer_2").is_dir()
    built, loaded = load_encoders("tiny"), load_encoders("tiny", str(folder))
    video = torch.rand(1, 3, 9, 48, 64) * 2 - 1
    torch.testing.assert_close(encode_video(loaded.vae, video), encode_video(built.vae, video))
    prompt = ["电凝钩切割组织"]
    torch.testing.assert_close(encode_prompts(loaded, prompt)[0], encode_prompts(built, prompt)[0])


def test_model_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--model is required for t2v-A14B"):
        load_encoders("t2v-A14B")
    with pytest.raises(UserError, match="not a diffusers-layout"):
        load_encoders("tiny", str(tmp_path))
