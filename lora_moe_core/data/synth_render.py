"""Drawing of the synthetic clips: drifting, breathing tissue and metallic instruments with tip boxes.

``render_clip`` plans one smooth motion per instrument family (entry edge, tip path, blade/jaw opening
or cautery activity), then draws every frame: tissue, tissue-side effects (blood pool, burn glow), the
instruments' shadows, the instruments, smoke, and the vignette. Everything is a function of the
generator passed in; see ``lora_moe_core.data.synth`` for the reproducibility promise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_STEEL = np.array([0.93, 0.96, 1.0])  # slightly cool grey: polished stainless steel

# --- motion plan --------------------------------------------------------------------------------------


@dataclass
class _Tool:
    family: str
    entry: np.ndarray  # [2] trocar pivot in pixels, outside the frame
    tips: np.ndarray  # [T, 2] tip base (where the family-specific tip starts) per frame, pixels
    state: np.ndarray  # [T] blade/jaw opening (rad) or, for the hook, cautery activity in [0, 1]
    haze: np.ndarray  # [T] accumulated smoke (hook only)
    side: float  # +1/-1: which way the hook and the blade curvature point


def _wave(rng: np.random.Generator, t: np.ndarray, f_lo: float, f_hi: float) -> np.ndarray:
    """A smooth random signal in [-1, 1]: two sines at random frequencies (Hz) and phases."""
    f = rng.uniform(f_lo, f_hi, 2)
    phase = rng.uniform(0, 2 * math.pi, 2)
    weight = rng.uniform(0.5, 1.0, 2)
    return (weight[:, None] * np.sin(2 * math.pi * f[:, None] * t + phase[:, None])).sum(0) / weight.sum()


def _plan_tools(rng: np.random.Generator, families: list[str], width: int, height: int, t: np.ndarray) -> list[_Tool]:
    """Entry edges, smooth tip paths and opening/activity signals, one tool per family."""
    edges = rng.choice(4, size=len(families), replace=False, p=[0.3, 0.3, 0.15, 0.25])  # left right top bottom
    tools = []
    for family, edge in zip(families, edges, strict=True):
        inward = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]][edge], dtype=float)
        along = rng.uniform(0.2, 0.8)
        entry = 0.5 - 0.85 * inward + (along - 0.5) * np.abs(inward[::-1])  # 35% beyond the edge
        # Tips stay on their own side of the frame so two instruments rarely cross.
        centre = 0.5 - 0.17 * inward + rng.uniform(-0.05, 0.05, 2)
        tips = centre + 0.13 * np.stack([_wave(rng, t, 0.25, 0.7), _wave(rng, t, 0.25, 0.7)], axis=1)
        scale = np.array([width, height], dtype=float)
        if family in ("Scissors", "Other"):
            state = (0.7 if family == "Scissors" else 0.8) * (0.5 + 0.5 * _wave(rng, t, 0.6, 1.4))
        elif family == "Hook":
            state = np.clip((_wave(rng, t, 0.3, 0.8) - 0.1) / 0.6, 0.0, 1.0)
        else:
            state = np.zeros_like(t)
        haze = np.zeros_like(t)
        for k in range(len(t)):  # smoke builds up while the hook burns and slowly clears
            haze[k] = 0.8 * (haze[k - 1] if k else 0.0) + 0.3 * state[k]
        tools.append(_Tool(family, entry * scale, tips * scale, state, np.clip(haze, 0, 1), float(rng.choice([-1, 1]))))
    return tools


# --- drawing --------------------------------------------------------------------------------------------


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    s = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return s * s * (3 - 2 * s)


class _Field:
    """A smooth random field: a sum of plane waves with unit variance.

    Evaluated on an axis-aligned grid as two small matrix products (cos(a+b) splits into
    products of x-only and y-only factors), so a frame costs O(n·(H+W) + H·W·n/BLAS).
    """

    def __init__(self, rng: np.random.Generator, n: int, wl_lo: float, wl_hi: float):
        k = 2 * math.pi / rng.uniform(wl_lo, wl_hi, n)
        angle = rng.uniform(0, math.pi, n)
        self.kx, self.ky = k * np.cos(angle), k * np.sin(angle)
        self.phase = rng.uniform(0, 2 * math.pi, n)
        amp = rng.uniform(0.5, 1.0, n)
        self.amp = amp / np.sqrt((amp**2).sum() / 2)

    def __call__(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        ax = self.kx[:, None] * xs[None, :] + self.phase[:, None]  # [n, W]
        ay = self.ky[:, None] * ys[None, :]  # [n, H]
        return (self.amp[:, None] * np.cos(ay)).T @ np.cos(ax) - (self.amp[:, None] * np.sin(ay)).T @ np.sin(ax)


class _Tissue:
    """Pink/red tissue with fat, vessels and wet highlights, drifting (camera) and breathing (scale)."""

    def __init__(self, rng: np.random.Generator, width: int, height: int):
        s = min(width, height)
        self.width, self.height = width, height
        self.base, self.detail = _Field(rng, 12, 0.5 * s, 1.5 * s), _Field(rng, 16, 0.08 * s, 0.25 * s)
        self.fat, self.gate = _Field(rng, 8, 0.6 * s, 1.5 * s), _Field(rng, 6, 0.8 * s, 1.5 * s)
        self.vessel, self.spec = _Field(rng, 12, 0.3 * s, 0.8 * s), _Field(rng, 16, 0.12 * s, 0.3 * s)
        self.drift = rng.normal(0, 0.05 * s, 2)  # pixels per second
        self.breath = (rng.uniform(0.2, 0.35), rng.uniform(0, 2 * math.pi))  # Hz, phase
        jitter = rng.uniform(-0.04, 0.04, 3)
        self.deep, self.pink = np.array([0.50, 0.10, 0.10]) + jitter, np.array([0.86, 0.42, 0.40]) + jitter
        yy, xx = np.mgrid[0:height, 0:width]
        radius = np.hypot(xx - width / 2, yy - height / 2) / np.hypot(width / 2, height / 2)
        self.vignette = (1 - 0.5 * radius**2)[..., None]  # laparoscope light falls off to the corners

    def __call__(self, t: float) -> np.ndarray:
        """The tissue at time t (seconds) as float RGB [H, W, 3] in [0, 1], before the vignette."""
        scale = 1 + 0.03 * math.sin(2 * math.pi * self.breath[0] * t + self.breath[1])
        xs = (np.arange(self.width) - self.width / 2) * scale + self.drift[0] * t
        ys = (np.arange(self.height) - self.height / 2) * scale + self.drift[1] * t
        base = _smoothstep(-1.6, 1.6, self.base(xs, ys))[..., None]
        img = self.deep + (self.pink - self.deep) * base
        img = img * (1 + 0.08 * self.detail(xs, ys))[..., None]
        fat = 0.8 * _smoothstep(0.7, 1.5, self.fat(xs, ys))[..., None]
        img += (np.array([0.92, 0.78, 0.45]) - img) * fat
        vessel = np.exp(-((self.vessel(xs, ys) / 0.13) ** 2)) * _smoothstep(-0.3, 0.5, self.gate(xs, ys))
        img += (np.array([0.38, 0.04, 0.10]) - img) * (0.85 * vessel)[..., None]
        # Wet highlights: sparse peaks of a finer field, only on the bulging (bright) tissue.
        spec = np.clip((self.spec(xs, ys) - 1.8) / 0.6, 0, 1) ** 2 * _smoothstep(0.3, 0.8, base[..., 0])
        return img + (1 - img) * (0.85 * spec)[..., None]


def _rot(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along and across the direction at ``angle`` from the tool axis."""
    c, s = math.cos(angle), math.sin(angle)
    return u * c + v * s, -u * s + v * c


def _seg_dist(u: np.ndarray, v: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance from every pixel to the segment a-b (tool coordinates)."""
    du, dv = b[0] - a[0], b[1] - a[1]
    s = np.clip(((u - a[0]) * du + (v - a[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - a[0] - s * du, v - a[1] - s * dv)


def _metal(n: np.ndarray) -> np.ndarray:
    """Luminance across a polished cylinder (n in [-1, 1]): diffuse falloff plus a specular stripe."""
    n = np.clip(n, -1, 1)
    return 0.32 + 0.42 * np.sqrt(1 - n * n) + 0.3 * np.exp(-(((n + 0.45) / 0.22) ** 2))


def _scissors(u, v, r, length, opening, side):
    mask, lum = np.zeros(u.shape, bool), np.zeros(u.shape)
    for sign, shade in ((-1, 0.8), (1, 1.0)):  # the upper blade is drawn last, on top
        ub, vb = _rot(u, v, sign * opening / 2)
        x = ub / length
        offset = vb - side * 0.18 * length * x**2  # curved (Metzenbaum-like) blades
        half = 0.8 * r * (1 - 0.85 * np.clip(x, 0, 1))  # tapering to a point
        blade = (ub >= -0.3 * r) & (x <= 1) & (np.abs(offset) <= half)
        lum = np.where(blade, shade * (0.55 + 0.4 * (1 - np.abs(offset) / np.maximum(half, 1e-6))), lum)
        mask |= blade
    screw = np.hypot(u, v) <= 0.45 * r
    return mask | screw, np.where(screw, 0.3, lum)


def _hook(u, v, r, length, active, side):
    w = max(0.32 * r, 0.9)
    elbow = 0.78 * length
    sheath = (u >= 0) & (u <= 0.25 * length) & (np.abs(v) <= r * (1 - u / (0.25 * length)) + w)
    bend = (elbow + 0.1 * length, side * 0.4 * length)
    wire = np.minimum(_seg_dist(u, v, (0, 0), (elbow, 0)), _seg_dist(u, v, (elbow, 0), bend))
    metal = wire <= w
    lum = np.where(metal, 0.72 + 0.25 * active + 0.1 * (1 - wire / w), 0.2 + 0.15 * _metal(v / r))  # black insulation
    return metal | sheath, lum


def _suction(u, v, r, length, _state, _side):
    rt = 0.7 * r  # the suction tube is narrower than the shaft: a visible step
    tube = (u >= 0) & (u <= length) & (np.abs(v) <= rt)
    end = ((u - length) / (0.7 * rt)) ** 2 + (v / (1.1 * rt)) ** 2  # the round open end, seen obliquely
    lum = np.where(end <= 1, 0.9, _metal(v / rt))
    return tube | (end <= 1), np.where(end <= 0.4, 0.06, lum)  # dark lumen


def _grasper(u, v, r, length, opening, _side):
    clevis = (u >= -0.3 * r) & (u <= 0.5 * r) & (np.abs(v) <= 1.05 * r)
    mask, lum = clevis, np.where(clevis, 0.85 * _metal(v / (1.05 * r)), 0.0)
    period = max(2.0, 0.12 * length)
    for sign in (-1, 1):
        ub, vb = _rot(u - 0.3 * r, v, sign * opening / 2)
        jaw = (ub >= 0) & (ub <= 0.72 * length) & (np.abs(vb) <= 0.6 * r)
        teeth = (sign * vb < 0) & (np.mod(ub, period) < period / 2)  # serration on the inner face
        lum = np.where(jaw, np.where(teeth, 0.3, 0.8 - 0.15 * np.abs(vb) / r), lum)
        mask = mask | jaw
    return mask, lum


_TIPS = {"Scissors": _scissors, "Hook": _hook, "Suction": _suction, "Other": _grasper}


def _tool_layer(tool: _Tool, k: int, xx: np.ndarray, yy: np.ndarray, size: int):
    """Mask, luminance and tip mask of one instrument in frame k."""
    tip = tool.tips[k]
    axis = tip - tool.entry
    dist = float(np.hypot(*axis))
    d = axis / dist
    u = (xx - tip[0]) * d[0] + (yy - tip[1]) * d[1]  # along the shaft, 0 at the tip base
    v = (yy - tip[1]) * d[0] - (xx - tip[0]) * d[1]  # across it
    r, length = 0.04 * size, 0.18 * size
    rs = r * (1 - 0.5 * u / dist)  # wider towards the trocar: closer to the camera
    shaft = (u <= 0) & (np.abs(v) <= rs)
    collar = shaft & (u >= -0.6 * r)  # darker ring where the tip mechanism joins the shaft
    lum = _metal(v / rs) * np.where(collar, 0.7, 1.0)
    tip_mask, tip_lum = _TIPS[tool.family](u, v, r, length, tool.state[k], tool.side)
    mask = shaft | tip_mask
    return mask, np.where(tip_mask, tip_lum, lum), mask & (u >= -r)


def _tool_point(tool: _Tool, k: int, along: float, across: float) -> np.ndarray:
    tip = tool.tips[k]
    d = (tip - tool.entry) / np.hypot(*(tip - tool.entry))
    return tip + along * d + across * np.array([-d[1], d[0]])


def _blob(xx, yy, centre, sigma):
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma * sigma))


def _effects_under(img, tool, k, n_frames, xx, yy, size):
    """Tissue-side effects: the blood pool being aspirated, the glow where the hook burns."""
    if tool.family == "Suction":
        centre = np.mean([_tool_point(tool, j, 0.2 * size, 0) for j in range(n_frames)], axis=0)
        theta = np.arctan2(yy - centre[1], xx - centre[0])
        radius = 0.13 * size * (1 - 0.5 * k / max(n_frames, 1)) * (1 + 0.08 * np.sin(2 * theta + tool.side))
        pool = _smoothstep(1.0, 0.85, np.hypot(xx - centre[0], yy - centre[1]) / radius)[..., None]
        img += (np.array([0.42, 0.02, 0.04]) - img) * pool
    elif tool.family == "Hook" and tool.state[k] > 0:
        burn = _tool_point(tool, k, 0.86 * 0.18 * size, tool.side * 0.4 * 0.18 * size)
        img += tool.state[k] * 0.9 * _blob(xx, yy, burn, 0.06 * size)[..., None] * np.array([1.0, 0.85, 0.55])


def _smoke(img, tool, k, xx, yy, size):
    if tool.family == "Hook" and tool.haze[k] > 0.01:
        centre = _tool_point(tool, k, 0.8 * 0.18 * size, 0) - np.array([0, 0.1 * size * tool.haze[k]])
        alpha = (0.45 * tool.haze[k] * _blob(xx, yy, centre, 0.16 * size))[..., None]
        img += (np.array([0.88, 0.86, 0.84]) - img) * alpha


def _box(mask: np.ndarray, fallback: np.ndarray, width: int, height: int) -> list[int]:
    """[x0, y0, x1, y1] of the mask (x1/y1 exclusive) padded by 1 px and clamped to the frame."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if cols.size == 0:  # tip entirely hidden: a 1-px box at the (clamped) tip point
        x, y = int(np.clip(fallback[0], 0, width - 1)), int(np.clip(fallback[1], 0, height - 1))
        return [x, y, x + 1, y + 1]
    return [max(int(cols[0]) - 1, 0), max(int(rows[0]) - 1, 0), min(int(cols[-1]) + 2, width),
            min(int(rows[-1]) + 2, height)]  # fmt: skip


def render_clip(
    rng: np.random.Generator, families: list[str], width: int, height: int, num_frames: int, fps: int
) -> tuple[np.ndarray, list[list[list[int]]]]:
    """Draw one clip: uint8 frames [T, H, W, 3] and per-frame tip boxes (one per family, same order)."""
    t = np.arange(num_frames) / fps
    tools = _plan_tools(rng, families, width, height, t)
    tissue = _Tissue(rng, width, height)
    size = min(width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    shadow_shift = (max(1, round(0.02 * size)), max(1, round(0.035 * size)))  # light sits above the lens
    frames, rois = np.empty((num_frames, height, width, 3), np.uint8), []
    for k in range(num_frames):
        img = tissue(float(t[k]))
        layers = [_tool_layer(tool, k, xx, yy, size) for tool in tools]
        for tool in tools:
            _effects_under(img, tool, k, num_frames, xx, yy, size)
        shadow = np.zeros((height, width), bool)
        for mask, _, _ in layers:
            dx, dy = shadow_shift
            shadow[dy:, dx:] |= mask[:-dy, :-dx]
        img *= (1 - 0.45 * shadow)[..., None]
        for mask, lum, _ in layers:
            img[mask] = lum[mask, None] * _STEEL
        for tool in tools:
            _smoke(img, tool, k, xx, yy, size)
        frames[k] = np.clip(img * tissue.vignette * 255 + 0.5, 0, 255).astype(np.uint8)
        rois.append([_box(tip, tool.tips[k], width, height) for (_, _, tip), tool in zip(layers, tools, strict=True)])
    return frames, rois
