"""Write the bad-input corpus that ``tests/test_bad_inputs.py`` feeds to the CLI (README.md lists the cases).

``python tests/data/bad/make_bad.py [FOLDER] [--reencode]`` writes the files (default: this folder). Every video is
derived from the committed ``ok.mp4`` (``--reencode`` encodes it afresh from fixed integer frames), the rest from
fixed arrays and bytes: the test suite checks that the committed files equal what this script writes.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CAPTION = "电凝钩分离胆囊三角组织"  # a good caption (names the Hook family)


# -- videos ------------------------------------------------------------------------------------------------------
def _frames(num_frames: int = 17, width: int = 64, height: int = 48) -> np.ndarray:
    """A moving white square on a red gradient: integer maths only, so every machine makes the same frames."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = (np.arange(width) * 255 // (width - 1)).astype(np.uint8)
    frames[..., 2] = 40
    for index in range(num_frames):
        frames[index, 16:32, 3 * index : 3 * index + 12] = 255
    return frames


def encode_ok() -> bytes:
    """``ok.mp4``: 64x48, 17 frames, 16 fps, H.264 (x264 single-threaded).

    x264's bytes are not a pure function of the frames in every process (after a torch matmul we saw the same
    frames encode to 2254 or 2255 bytes from run to run), so ``ok.mp4`` is encoded once and committed, and every
    other video here is derived from its bytes by remuxing or patching, which is exact.
    """
    import av

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=16, options={"crf": "30", "preset": "medium"})
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            stream.codec_context.thread_count = 1
            for frame in _frames():
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
            container.mux(stream.encode())
        return path.read_bytes()


def _remux(ok: bytes, fps: Fraction | None = None, movflags: str | None = None) -> bytes:
    """``ok`` remuxed without re-encoding: timestamps stretched so that it plays at ``fps``, or the moov box moved
    first (``movflags="faststart"``)."""
    import av

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.mp4", Path(tmp) / "out.mp4"
        source.write_bytes(ok)
        options = {"movflags": movflags} if movflags else {}
        with av.open(str(source)) as reader, av.open(str(target), "w", format="mp4", options=options) as writer:
            stream_in = reader.streams.video[0]
            time_base = stream_in.time_base * (Fraction(stream_in.average_rate) / fps if fps else 1)
            stream_out = writer.add_stream_from_template(stream_in)
            stream_out.time_base = time_base
            for packet in reader.demux(stream_in):
                if packet.dts is not None:  # the demuxer's final empty flush packet
                    packet.stream, packet.time_base = stream_out, time_base
                    writer.mux(packet)
        return target.read_bytes()


def _audio_only() -> bytes:
    """An mp4 holding one second of AAC silence and no video stream."""
    import av

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audio.mp4"
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("aac", rate=16000, layout="mono")
            stream.codec_context.thread_count = 1
            for index in range(16):
                frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 16000, index * 1024
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        return path.read_bytes()


class _Bits:
    """Bit reader that re-emits what it reads, optionally replacing Exp-Golomb values (for the H.264 SPS)."""

    def __init__(self, data: bytes):
        self.bits = "".join(f"{byte:08b}" for byte in data)
        self.pos, self.out = 0, []

    def u(self, n: int) -> int:
        self.out.append(self.bits[self.pos : self.pos + n])
        self.pos += n
        return int(self.out[-1], 2)

    def ue(self, replace: int | None = None) -> int:
        zeros = self.bits.index("1", self.pos) - self.pos
        value = int(self.bits[self.pos + zeros : self.pos + 2 * zeros + 1], 2) - 1
        self.pos += 2 * zeros + 1
        code = f"{(value if replace is None else replace) + 1:b}"
        self.out.append("0" * (len(code) - 1) + code)
        return value

    def rest(self) -> bytes:
        """The re-emitted bits, the unread tail and a fresh rbsp stop bit, as bytes."""
        tail = self.bits[self.pos :].rstrip("0")[:-1]  # drop the old stop bit and its alignment zeros
        bits = "".join(self.out) + tail + "1"
        bits += "0" * (-len(bits) % 8)
        return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def _escape(rbsp: bytes) -> bytes:
    """Insert H.264 emulation-prevention bytes (00 00 0x → 00 00 03 0x for x <= 3)."""
    out, zeros = bytearray(), 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _huge_sps(sps: bytes, width: int, height: int) -> bytes:
    """The SPS NAL unit with pic_width/height_in_mbs set to ``width``/16 and ``height``/16 (x264's layout)."""
    bits = _Bits(sps.replace(b"\x00\x00\x03", b"\x00\x00"))
    bits.u(8)  # NAL header
    profile = bits.u(8)
    bits.u(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        if bits.ue() == 3:  # chroma_format_idc
            bits.u(1)
        bits.ue(), bits.ue(), bits.u(1)  # bit depths, transform bypass
        if bits.u(1):
            raise ValueError("scaling matrices in the SPS are not handled")
    bits.ue()  # log2_max_frame_num_minus4
    if bits.ue() == 0:  # pic_order_cnt_type
        bits.ue()
    bits.ue(), bits.u(1)  # max_num_ref_frames, gaps_in_frame_num_allowed
    bits.ue(replace=width // 16 - 1), bits.ue(replace=height // 16 - 1)  # picture size in macroblocks
    if not bits.u(1):  # frame_mbs_only
        bits.u(1)
    bits.u(1)  # direct_8x8_inference
    if bits.u(1):  # 64x48 needs no cropping: a cropped stream would come from another encoder setting
        raise ValueError("frame cropping in the SPS is not handled")
    return _escape(bits.rest())


_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _patch_boxes(data: bytes, patch: Callable[[bytes, bytes], bytes], claimed: tuple[int, int]) -> bytes:
    """Rewrite an mp4 box tree: ``patch(type, payload)`` on every leaf, ``claimed`` (w, h) in the avc1 entry."""
    out, pos = bytearray(), 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        payload = data[pos + 8 : pos + size]
        if kind in _CONTAINERS:
            payload = _patch_boxes(payload, patch, claimed)
        elif kind == b"stsd":  # version/flags + entry count, then sample entries
            payload = payload[:8] + _patch_boxes(payload[8:], patch, claimed)
        elif kind == b"avc1":  # 78 bytes of visual sample entry (width, height at 24), then avcC and friends
            payload = (
                payload[:24]
                + struct.pack(">HH", *claimed)
                + payload[28:78]
                + _patch_boxes(payload[78:], patch, claimed)
            )
        else:
            payload = patch(kind, payload)
        out += struct.pack(">I4s", len(payload) + 8, kind) + payload  # sizes follow the rewritten payloads
        pos += size
    return bytes(out)


def _huge_resolution(ok: bytes, width: int, height: int) -> bytes:
    """The 64x48 clip with its container and SPS claiming ``width``x``height`` (moov follows mdat, so no chunk
    offset moves). FFmpeg decodes it to garbage frames of the claimed size: 403 MB per RGB frame at 16384x8192."""

    def patch(kind: bytes, payload: bytes) -> bytes:
        if kind == b"tkhd":  # width and height: the last 8 bytes, 16.16 fixed point
            return payload[:-8] + struct.pack(">II", width << 16, height << 16)
        if kind == b"avcC":  # 5 header bytes, then [SPS count][SPS length][SPS]...
            count, length = payload[5] & 0x1F, struct.unpack(">H", payload[6:8])[0]
            if count != 1:
                raise ValueError("expected one SPS")
            sps = _huge_sps(payload[8 : 8 + length], width, height)
            return payload[:6] + struct.pack(">H", len(sps)) + sps + payload[8 + length :]
        return payload

    return _patch_boxes(ok, patch, (width, height))


def _truncated(ok: bytes) -> bytes:
    """``ok`` with its last tenth cut off, header first (faststart) so that the header survives the cut."""
    data = _remux(ok, movflags="faststart")
    return data[: len(data) * 9 // 10]


def _jsonl(*records: object) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()


# -- LoRA files ---------------------------------------------------------------------------------------------------
def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file written by hand: u64 header length, JSON header, raw little-endian float32 data."""
    header, blobs, offset = {}, [], 0
    for key, array in tensors.items():
        blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _ramp(*shape: int) -> np.ndarray:
    return (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 7 - 3) / 8


def _lora(down: np.ndarray, up: np.ndarray, module: str = "lora_unet_blocks_3_self_attn_q") -> bytes:
    """A musubi-layout LoRA of one module (blocks.3.attn1.to_q of the tiny test DiT: 24 -> 24)."""
    return _safetensors({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                         f"{module}.alpha": np.array(1.0, np.float32)})  # fmt: skip


def _lora_with(value: float) -> bytes:
    down = _ramp(4, 24)
    down[1, 5] = value
    return _lora(down, _ramp(24, 4))


def _fp8_lora(module: str = "lora_unet_blocks_3_self_attn_q") -> bytes:
    """A musubi LoRA stored in float8 e4m3 (1 byte a value; bytes 0x30-0x36 are finite values 0.5-0.875)."""
    header, blobs, offset = {}, [], 0
    for key, shape in ((f"{module}.lora_down.weight", [4, 24]), (f"{module}.lora_up.weight", [24, 4])):
        blob = bytes(0x30 + index % 7 for index in range(shape[0] * shape[1]))
        header[key] = {"dtype": "F8_E4M3", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _tracking_garbage() -> bytes:
    """A fallback file whose first line is JSON but no tracking call (a metrics line without step or payload)."""
    return _jsonl({"tracker": "t1", "kind": "metrics", "seq": 1}, {"tracker": "t1", "kind": "close", "seq": 2})


class _Tensor:
    """Pickles as a call of ``torch._utils._rebuild_tensor_v2``, as a real checkpoint does (nothing here loads it)."""

    def __reduce__(self):
        import torch._utils

        return (torch._utils._rebuild_tensor_v2, ("storage", 0, (4, 24), (24, 1), False, {}))


def _legacy_pickle() -> bytes:
    """A pre-zip torch checkpoint, as old kohya scripts saved ``.ckpt`` LoRAs: a protocol-2 pickle."""
    return pickle.dumps({"state_dict": {"lora_unet_blocks_3_self_attn_q.lora_down.weight": _Tensor()}}, protocol=2)


def _zip_pickle() -> bytes:
    """A ``torch.save`` style zip: ``archive/data.pkl`` and ``archive/version``, with fixed timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in (("archive/data.pkl", _legacy_pickle()), ("archive/version", b"3\n")):
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


# -- the corpus ---------------------------------------------------------------------------------------------------
def corpus(ok: bytes) -> dict[str, bytes]:
    """Every file of the corpus by path relative to this folder, the videos derived from ``ok`` (``ok.mp4``)."""
    ok_lora = _lora(_ramp(4, 24), _ramp(24, 4))
    return {
        "ok.mp4": ok,
        "ok.jsonl": _jsonl({"video_path": "ok.mp4", "caption": CAPTION}),
        "empty.mp4": b"",
        "not_a_video.mp4": b"<html><body><h1>404 Not Found</h1></body></html>\n",
        "truncated.mp4": _truncated(ok),
        "huge_16384x8192.mp4": _huge_resolution(ok, 16384, 8192),
        "huge_16384x16384.mp4": _huge_resolution(ok, 16384, 16384),
        "fps_10000.mp4": _remux(ok, fps=Fraction(10000)),
        "fps_0.001.mp4": _remux(ok, fps=Fraction(1, 1000)),
        "audio_only.mp4": _audio_only(),
        "caption_control_chars.jsonl": _jsonl({"video_path": "ok.mp4", "caption": "电凝钩\x1b[31m分离组织\x07"}),
        "caption_invalid_utf8.jsonl": b'{"video_path": "ok.mp4", "caption": "Latin-1: cr\xe8me br\xfbl\xe9e hook"}\n',
        "caption_dir/dataset.toml": b'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\n'
        b'video_directory = "videos"\n',
        "caption_dir/videos/clip.mp4": ok,
        "caption_dir/videos/clip.txt": "电凝钩\x00分离组织".encode(),
        "manifest_escape.jsonl": _jsonl({"video_path": "../../../../etc/passwd", "caption": CAPTION}),
        "manifest_not_object.jsonl": _jsonl(["ok.mp4", CAPTION]),
        "manifest_empty.jsonl": b"",
        "manifest_bad_roi.jsonl": _jsonl({"video_path": "ok.mp4", "caption": CAPTION, "roi": [[8, 8, 24, 24], [8, 8]]}),
        "dataset_bad_resolution.toml": b'[general]\nresolution = "832x480"\n\n[[datasets]]\n'
        b'video_jsonl_file = "ok.jsonl"\n',
        "labels_invalid_utf8.jsonl": b'{"video_path": "ok.mp4", "families": ["Hook\xff"]}\n',
        "labels_not_object.jsonl": b'"Hook"\n',
        "config_unknown_key.toml": b"[training]\nlearning_rte = 1e-4\n",
        "config_wrong_type.toml": b'[training]\nnum_train_epochs = "twenty"\n',
        "config_negative_rank.toml": b"[lora]\nlora_dim = -4\n",
        "config_invalid_utf8.toml": b'[training]\nexperiment = "chirurgie \xe9t\xe9"\n',
        "lora_nan.safetensors": _lora_with(float("nan")),
        "lora_inf.safetensors": _lora_with(float("inf")),
        "lora_wrong_shapes.safetensors": _lora(_ramp(4, 24), _ramp(24, 8)),
        "lora_bogus_header.safetensors": struct.pack("<Q", 1 << 62) + ok_lora[8:],  # claims a 4 EiB header
        "lora_truncated.safetensors": ok_lora[:-100],
        "lora_pickle.ckpt": _legacy_pickle(),
        "lora_pickle.pt": _zip_pickle(),
        # round two (issue #14)
        "prompts_escape.jsonl": _jsonl({"prompt": CAPTION, "output_path": "../../x.mp4"}),
        "dataset_huge_resolution.toml": b"[general]\nresolution = [65536, 65536]\n\n[[datasets]]\n"
        b'video_jsonl_file = "ok.jsonl"\n',
        "labels_other_videos.jsonl": _jsonl(
            {"video_path": "other.mp4", "families": ["Hook"], "probs": [0.0, 1.0, 0.0, 0.0]}
        ),  # fmt: skip
        "labels_zero_probs.jsonl": _jsonl({"video_path": "ok.mp4", "families": [], "probs": [0, 0, 0, 0]}),
        "config_inf_lr.toml": b"[training]\nlearning_rate = inf\n",
        "config_zero_ranks.toml": b"[lora]\nrank_q = 0\nrank_k = 0\nrank_v = 0\nrank_o = 0\nrank_ffn = 0\n",
        "config_deep.toml": b"[training]\nexperiment = " + b"[" * 2000 + b"\n",
        "manifest_deep.jsonl": b"[" * 2000 + b"\n",
        "manifest_bigint.jsonl": b'{"video_path": "ok.mp4", "caption": "hook", "id": ' + b"9" * 5000 + b"}\n",
        "caption_surrogate.jsonl": b'{"video_path": "ok.mp4", "caption": "hook \\ud800 cautery"}\n',
        "caption_bidi.jsonl": _jsonl({"video_path": "ok.mp4", "caption": "电凝钩\u202e分离组织"}),
        "lora_rank0.safetensors": _lora(np.zeros((0, 24), np.float32), np.zeros((24, 0), np.float32)),
        "lora_fp8.safetensors": _fp8_lora(),
        "tracking_garbage.jsonl": _tracking_garbage(),
        "tracking_no_json.jsonl": b"this is not a tracking file\nnor is this\n",
    }


def main(folder: Path = HERE, reencode: bool = False) -> None:
    """Write the corpus into ``folder``, from this folder's ``ok.mp4`` unless there is none or ``reencode``."""
    ok_path = HERE / "ok.mp4"
    files = corpus(encode_ok() if reencode or not ok_path.exists() else ok_path.read_bytes())
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    print(f"wrote {len(files)} files ({sum(map(len, files.values()))} bytes) to {folder}")


if __name__ == "__main__":
    arguments = [arg for arg in sys.argv[1:] if arg != "--reencode"]
    main(Path(arguments[0]) if arguments else HERE, reencode="--reencode" in sys.argv)
