"""Procedural images and their intended edits: the quickstart's ground truth.

- ``draw_source_image(rng, size)``: a flat background with 2-4 circles, rectangles or stripe bands (uint8 RGB).
- ``intended_edit(rgb, instruction, strength)``: what a good editor makes of it for each quickstart instruction,
  keeping every shape in place:
  * "make it red / blue / green": a tint toward the colour whose brightness follows the source's luma,
    ``out = (1 - a) * x + a * c * (0.35 + 0.65 * Y)`` (``c`` the colour, ``Y`` the BT.601 luma, ``a`` the strength),
    so the luma of the result is an increasing affine function of the source's luma (the shapes stay visible);
  * "make it darker": ``out = (1 - a) * x``; "make it brighter": ``out = 1 - (1 - a) * (1 - x)``.
  Default strength 0.55. It serves as the flow-matching target of the trained tiny editor
  (:mod:`editrl.common.families.tiny.train_editor`) and as the "intended edit" row of the metric's table
  (docs/JUDGES.md); the metric itself never calls it (it scores any edit from the instruction alone).
- ``reward_cases(rgb, instruction, seed)``: that table's rows -- the identity edit, the intended edit and the edits a
  policy could try to game a reward with (flat colours, noise, heavy artifacts, a faint wash), for the metric's
  ordering test and ``bench.bench_metric``.
"""

from __future__ import annotations

import numpy as np

# The quickstart instructions and the task type each belongs to (EditScore-RL-Data task names).
QUICKSTART_INSTRUCTIONS: dict[str, str] = {
    "make it red": "color_alter",
    "make it blue": "color_alter",
    "make it green": "color_alter",
    "make it darker": "tone_transfer",
    "make it brighter": "tone_transfer",
}
_TINTS: dict[str, tuple[float, float, float]] = {
    "make it red": (1.0, 0.0, 0.0),
    "make it blue": (0.0, 0.0, 1.0),
    "make it green": (0.0, 1.0, 0.0),
}
_LUMA = np.array([0.299, 0.587, 0.114])
DEFAULT_STRENGTH = 0.55


def draw_source_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural source image [size, size, 3] uint8: a flat background with 2-4 circles, rectangles or stripes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # [H, W] each
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = rng.uniform(40, 215, size=3)
    for _ in range(int(rng.integers(2, 5))):
        colour = rng.uniform(0, 255, size=3)
        kind = int(rng.integers(0, 3))
        if kind == 0:  # circle
            cy, cx = rng.uniform(0.2, 0.8, size=2) * size
            radius = rng.uniform(0.1, 0.3) * size
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        elif kind == 1:  # axis-aligned rectangle
            y0, x0 = rng.uniform(0.0, 0.6, size=2) * size
            height, width = rng.uniform(0.2, 0.5, size=2) * size
            mask = (yy >= y0) & (yy < y0 + height) & (xx >= x0) & (xx < x0 + width)
        else:  # stripes, horizontal or vertical, inside a band
            period = max(2, int(rng.integers(4, 12)) * size // 64)
            axis = xx if rng.random() < 0.5 else yy
            band_start = rng.uniform(0.0, 0.5) * size
            mask = ((axis // period) % 2 == 0) & (axis >= band_start) & (axis < band_start + size / 2)
        image[mask] = colour
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def intended_edit(rgb: np.ndarray, instruction: str, strength: float = DEFAULT_STRENGTH) -> np.ndarray:
    """The intended edit of a uint8 [H, W, 3] image for a quickstart instruction (see the module docstring)."""
    if instruction not in QUICKSTART_INSTRUCTIONS:
        raise ValueError(f"no intended edit for {instruction!r}; known: {sorted(QUICKSTART_INSTRUCTIONS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    x = rgb.astype(np.float64) / 255.0
    if instruction in _TINTS:
        luma = x @ _LUMA
        out = (1.0 - strength) * x + strength * np.asarray(_TINTS[instruction]) * (0.35 + 0.65 * luma)[..., None]
    elif instruction == "make it darker":
        out = (1.0 - strength) * x
    else:
        out = 1.0 - (1.0 - strength) * (1.0 - x)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


_FLAT_TARGETS = {"make it red": (230, 30, 30), "make it blue": (30, 30, 230), "make it green": (30, 230, 30),
                 "make it darker": (10, 10, 10), "make it brighter": (0, 255, 255)}  # fmt: skip


def reward_cases(rgb: np.ndarray, instruction: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Named uint8 edits of ``rgb`` for ``instruction`` (see the module docstring); noise drawn from ``seed``."""
    intended = intended_edit(rgb, instruction)
    rng = np.random.default_rng(seed)
    flat = _FLAT_TARGETS[instruction]
    return {
        "identity (unchanged)": rgb,
        "intended edit": intended,
        "flat target colour": np.broadcast_to(np.array(flat, dtype=np.uint8), rgb.shape),
        "flat mean colour of the intended edit": np.broadcast_to(
            intended.reshape(-1, 3).mean(0).astype(np.uint8), rgb.shape
        ),
        "uniform noise": rng.integers(0, 256, rgb.shape, dtype=np.uint8),
        "intended + heavy noise (sigma 40/255)": np.clip(intended + rng.normal(0, 40, rgb.shape), 0, 255).astype(
            np.uint8
        ),
        "faint wash (90 % target colour)": (0.9 * np.array(flat) + 0.1 * rgb).astype(np.uint8),
    }
