"""MetricBackend: a model-free, VIEScore-shaped reward for colour and tone edits (pure numpy, deterministic).

- SC (semantic consistency: did the edit do what the instruction asks) comes from a target parsed from the
  instruction by case-insensitive keywords:
  * a colour (red, orange, yellow, green, cyan, blue, purple, magenta, pink): the *affinity* of an image is the
    projection of its mean colour's chroma (mean RGB minus its grey level) onto the target hue, scaled so a fully
    saturated primary scores 1 (grey 0, the complementary hue -1). The shift is affinity(edit) - affinity(source).
  * darker / brighter: the shift is the change of mean luma (BT.601) relative to the room the source has left:
    darker = (Y_src - Y_edit) / Y_src, brighter = (Y_edit - Y_src) / (1 - Y_src).
  SC = 10 * sigmoid(slope * (shift - center)): an unchanged image gets about 3.8, strong moves approach 10 and
  moves the wrong way approach 0, with a non-zero gradient everywhere (RL needs graded rewards, also for the
  coloured-noise outputs of an untrained policy). A colour and a tone target together ("dark red") give the
  minimum of both SCs, as VIEScore takes the minimum of its sub-scores.
- PQ (structure kept from the source), ``mapping: strict`` (the default): the edit's grey (BT.601 luma) image is
  mapped to the source's global mean and standard deviation, so a global brightness or contrast change (darker,
  brighter, a tint) keeps its structure, and compared with the source's by SSIM (``structure`` in [-1, 1], the
  stabilisers of data range 1 in the source's units). The contrast kept,
  ``contrast = min(1, (std_edit / std_source) / contrast_floor)``, multiplies it: an edit that flattens the image
  (a flat colour, a faint wash over a bright colour) keeps no structure however its windows correlate. Then
  ``PQ = 10 * sigmoid(pq_slope * (kept - pq_center)) / sigmoid(pq_slope * (1 - pq_center))``: 10 for an
  unchanged structure, about 7.9 at 0.8, 2.4 at 0.6 and under 0.4 at 0.4 or less (SSIM 0.5 is a poor score).
- SC counts the requested change *within the kept structure*: the target shift is multiplied by ``max(kept, 0)``
  before the ramp, so a flat cyan square scores the SC of an unchanged image for "make it brighter", not 8.6.
- overall = sqrt(SC * PQ), VIEScore's combination, on 0-10. With both, a picture with none of the source left
  scores near 0 whatever its colour; the intended edit scores above the identity edit, which scores above flat
  colours and noise (the table in docs/JUDGES.md; tests/unit/scorer/test_metric.py holds the ordering).
- ``mapping: legacy`` is the issue-11 reward, kept to show what it allowed: PQ = (SSIM(grey source, grey edit) + 1)
  / 2 * 10 and an ungated SC. A policy learns to paint flat colours under it (SSIM 0.47 still gives PQ 7.3); the
  reward-hacking alarm's test trains on it with the strict metric as the held-out check.

An instruction without a recognised target, or with conflicting ones (two colours, darker and brighter), leaves
every edit unscored (``scored=False, overall=None``) with the reason, quoting at most
:data:`~editrl.common.fit.QUOTE_CHARS` characters of the instruction: this backend never invents a number.
Edits are resized to the source size; both are then downscaled to at most ``max_side_px`` for speed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from editrl.common.fit import quote
from editrl.scorer.backend import Score, ScoreRequest

# Target hue of each colour word family (RGB in [0, 1]; only the chroma direction matters).
COLOUR_TARGETS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "purple": (0.5, 0.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "pink": (1.0, 0.4, 0.7),
}
COLOUR_WORDS: dict[str, str] = {
    **{word: "red" for word in ("red", "redder", "reddish", "crimson", "scarlet")},
    "orange": "orange",
    **{word: "yellow" for word in ("yellow", "yellower", "yellowish", "golden")},
    **{word: "green" for word in ("green", "greener", "greenish")},
    **{word: "cyan" for word in ("cyan", "teal", "turquoise")},
    **{word: "blue" for word in ("blue", "bluer", "bluish", "blueish")},
    **{word: "purple" for word in ("purple", "purplish", "violet")},
    "magenta": "magenta",
    **{word: "pink" for word in ("pink", "pinker", "pinkish")},
}
TONE_WORDS: dict[str, str] = {
    **{word: "darker" for word in ("darker", "dark", "darken", "dim", "dimmer", "dimmed")},
    **{word: "brighter" for word in ("brighter", "bright", "brighten", "lighter", "lighten")},
}
_WORD_RE = re.compile(r"[a-z]+")
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # BT.601
_FULL_CHROMA = math.sqrt(6.0) / 3.0  # chroma length of a saturated primary, e.g. red (1, 0, 0)
_TONE_EPS = 0.05  # floor of the luma headroom, so near-black/white sources do not blow the shift up
_SSIM_C1 = 0.01**2  # SSIM stabilisers for data range 1
_SSIM_C2 = 0.03**2
_STD_EPS = 1e-3  # an image whose luma std is below this counts as flat
_KIND_NAMES = {int: "an integer", float: "a number"}


def parse_targets(instruction: str) -> tuple[list[str], str | None]:
    """The SC targets named by ``instruction`` (at most one colour, then at most one tone) or the reason there are none."""
    words = _WORD_RE.findall(instruction.lower())
    colours = sorted({COLOUR_WORDS[word] for word in words if word in COLOUR_WORDS})
    tones = sorted({TONE_WORDS[word] for word in words if word in TONE_WORDS})
    if len(colours) > 1:
        return (
            [],
            f"instruction names several colours ({', '.join(colours)}); the metric backend cannot tell the target",
        )
    if len(tones) > 1:
        return [], "instruction asks for both darker and brighter; the metric backend cannot tell the target"
    if not colours and not tones:
        return [], "instruction names no colour or darker/brighter target the metric backend can measure"
    return colours + tones, None


@dataclass(frozen=True)
class _ImageStats:
    """What SC and PQ need from one image at the working size."""

    mean_rgb: np.ndarray  # [3] float64 in [0, 1]
    grey: np.ndarray  # [H, W] float64 luma in [0, 1]

    @property
    def luma(self) -> float:
        return float(self.grey.mean())

    def affinity(self, colour: str) -> float:
        """Projection of the mean chroma onto the colour's hue; 1 = saturated primary, 0 = grey."""
        target = np.asarray(COLOUR_TARGETS[colour], dtype=np.float64)
        direction = target - target.mean()
        chroma = self.mean_rgb - self.mean_rgb.mean()
        return float(chroma @ direction / np.linalg.norm(direction) / _FULL_CHROMA)


def _stats(image: Image.Image, size: tuple[int, int]) -> _ImageStats:
    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    rgb = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    grey = (rgb @ _LUMA_WEIGHTS).astype(np.float64)  # [H, W]
    return _ImageStats(mean_rgb=rgb.reshape(-1, 3).mean(axis=0, dtype=np.float64), grey=grey)


def _box_mean(x: np.ndarray, win: int) -> np.ndarray:
    """Mean over every win x win window (valid positions only): [H, W] -> [H-win+1, W-win+1]."""
    integral = np.zeros((x.shape[0] + 1, x.shape[1] + 1), dtype=np.float64)
    integral[1:, 1:] = x.cumsum(axis=0).cumsum(axis=1)
    sums = integral[win:, win:] - integral[:-win, win:] - integral[win:, :-win] + integral[:-win, :-win]
    return sums / (win * win)


def ssim(a: np.ndarray, b: np.ndarray, win: int = 7, data_range: float = 1.0) -> float:
    """Mean SSIM of two same-shape greyscale images (values spanning ``data_range``) with a uniform window; in
    [-1, 1], 1 iff equal."""
    win = max(1, min(win, a.shape[0], a.shape[1]))
    c1, c2 = _SSIM_C1 * data_range**2, _SSIM_C2 * data_range**2
    mu_a, mu_b = _box_mean(a, win), _box_mean(b, win)
    var_a = np.maximum(_box_mean(a * a, win) - mu_a * mu_a, 0.0)
    var_b = np.maximum(_box_mean(b * b, win) - mu_b * mu_b, 0.0)
    cov = _box_mean(a * b, win) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.clip((numerator / denominator).mean(), -1.0, 1.0))


def ssim_normalised(a: np.ndarray, b: np.ndarray, win: int = 7) -> float:
    """SSIM of greyscale ``a`` and ``b`` after ``b`` is mapped to ``a``'s global mean and standard deviation.

    A global brightness or contrast change of ``b`` therefore costs nothing; the SSIM stabilisers stay those of
    data range 1 in ``a``'s units, so small errors in a low-contrast source are not blown up. A flat ``b`` maps to
    ``a``'s mean (the caller's contrast-kept factor scores it).
    """
    b_matched = (b - b.mean()) / max(float(b.std()), _STD_EPS) * float(a.std()) + float(a.mean())
    return ssim(a, b_matched, win)


class MetricBackend:
    """Model-free VIEScore-shaped scores: SC from the instruction's colour/tone target, PQ from the structure kept."""

    name = "metric"
    OPTIONS = (
        "sc_center", "sc_slope", "max_side_px", "ssim_window_px", "mapping", "pq_center", "pq_slope", "contrast_floor"
    )  # fmt: skip
    MAPPINGS = ("strict", "legacy")

    def __init__(
        self,
        sc_center: float = 0.1,
        sc_slope: float = 5.0,
        max_side_px: int = 256,
        ssim_window_px: int = 7,
        mapping: str = "strict",
        pq_center: float = 0.7,
        pq_slope: float = 12.0,
        contrast_floor: float = 0.3,
    ) -> None:
        """``sc_center``/``sc_slope`` shape the SC ramp over the target shift, ``pq_center``/``pq_slope`` the strict
        PQ over the kept structure; sizes are in pixels (see the module docstring)."""
        if mapping not in self.MAPPINGS:
            raise ValueError(f"mapping must be one of {', '.join(self.MAPPINGS)}, got {mapping!r}")
        if not 0.0 < pq_slope <= 100.0:
            raise ValueError(f"pq_slope must be in (0, 100], got {pq_slope}")
        if not -1.0 <= pq_center <= 1.0:
            raise ValueError(f"pq_center must be in [-1, 1], got {pq_center}")
        if not 0.0 < contrast_floor <= 1.0:
            raise ValueError(f"contrast_floor must be in (0, 1], got {contrast_floor}")
        if not 0.0 < sc_slope <= 100.0:
            raise ValueError(f"sc_slope must be in (0, 100], got {sc_slope}")
        if not -1.0 <= sc_center <= 1.0:
            raise ValueError(f"sc_center must be in [-1, 1], got {sc_center}")
        if max_side_px < 8:
            raise ValueError(f"max_side_px must be >= 8, got {max_side_px}")
        if not 1 <= ssim_window_px <= 31:
            raise ValueError(f"ssim_window_px must be in [1, 31], got {ssim_window_px}")
        self.sc_center = float(sc_center)
        self.sc_slope = float(sc_slope)
        self.max_side_px = int(max_side_px)
        self.ssim_window_px = int(ssim_window_px)
        self.mapping = mapping
        self.pq_center, self.pq_slope, self.contrast_floor = float(pq_center), float(pq_slope), float(contrast_floor)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> MetricBackend:
        """Build from config options; unknown keys raise ValueError naming the allowed ones."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(f"unknown metric backend options {unknown}; allowed: {', '.join(cls.OPTIONS)}")
        kinds = {
            "sc_center": float, "sc_slope": float, "max_side_px": int, "ssim_window_px": int,
            "pq_center": float, "pq_slope": float, "contrast_floor": float,
        }  # fmt: skip
        typed: dict[str, Any] = {}
        for key, value in options.items():
            if key == "mapping":
                typed[key] = value  # checked by __init__
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (kinds[key] is int and value != int(value))
            ):
                raise ValueError(f"metric backend option {key} must be {_KIND_NAMES[kinds[key]]}, got {value!r}")
            typed[key] = kinds[key](value)
        return cls(**typed)

    def _ramp(self, shift: float) -> float:
        """SC on 0-10 from a target shift: smooth, monotone, never exactly 0 or 10 for finite shifts."""
        return 10.0 / (1.0 + math.exp(-self.sc_slope * (shift - self.sc_center)))

    def _working_size(self, source: Image.Image) -> tuple[int, int]:
        width, height = source.size
        factor = min(1.0, self.max_side_px / max(width, height))
        return max(1, round(width * factor)), max(1, round(height * factor))

    def _target_shift(self, target: str, src: _ImageStats, edit: _ImageStats, raw: dict[str, float]) -> float:
        """Shift toward ``target`` (positive = right direction); records the raw measurements in ``raw``."""
        if target in COLOUR_TARGETS:
            before, after = src.affinity(target), edit.affinity(target)
            shift = after - before
            raw.update({f"{target}_affinity_source": before, f"{target}_affinity_edit": after})
        else:
            before, after = src.luma, edit.luma
            if target == "darker":
                shift = (before - after) / max(before, _TONE_EPS)
            else:
                shift = (after - before) / max(1.0 - before, _TONE_EPS)
            raw.update({"luma_source": before, "luma_edit": after})
        raw[f"{target}_shift"] = shift
        return shift

    def _structure(self, src: _ImageStats, edit: _ImageStats) -> tuple[float, dict[str, float], str]:
        """(kept structure in [-1, 1], its measurements, a reason) under the configured mapping."""
        plain = ssim(src.grey, edit.grey, self.ssim_window_px)
        if self.mapping == "legacy":
            return plain, {"ssim": plain}, f"SSIM to source {plain:.3f}"
        std_src, std_edit = float(src.grey.std()), float(edit.grey.std())
        normalised = ssim_normalised(src.grey, edit.grey, self.ssim_window_px)
        contrast = min(1.0, std_edit / max(std_src, _STD_EPS) / self.contrast_floor)
        kept = normalised * contrast
        measured = {"ssim": plain, "ssim_normalised": normalised, "contrast_kept": contrast, "structure": kept}
        why = f"normalised SSIM {normalised:.3f} x contrast kept {contrast:.2f} = structure {kept:.3f}"
        return kept, measured, why

    def _pq(self, structure: float) -> float:
        if self.mapping == "legacy":
            return (structure + 1.0) / 2.0 * 10.0
        top = 1.0 / (1.0 + math.exp(-self.pq_slope * (1.0 - self.pq_center)))
        return 10.0 / (1.0 + math.exp(-self.pq_slope * (structure - self.pq_center))) / top

    def _score_edit(self, targets: list[str], src: _ImageStats, edit: _ImageStats) -> Score:
        raw: dict[str, float] = {}
        parts: list[str] = []
        structure, measured, why = self._structure(src, edit)
        gate = 1.0 if self.mapping == "legacy" else max(structure, 0.0)
        sc = 10.0
        for target in targets:
            shift = self._target_shift(target, src, edit, raw)
            target_sc = self._ramp(shift * gate)
            sc = min(sc, target_sc)
            gated = "" if self.mapping == "legacy" else f" (x structure {gate:.2f})"
            parts.append(f"{target} shift {shift:+.3f}{gated} -> SC {target_sc:.2f}")
        pq = self._pq(structure)
        overall = math.sqrt(sc * pq)
        reasoning = f"{'; '.join(parts)}; {why} -> PQ {pq:.2f}; overall sqrt(SC*PQ) {overall:.2f}"
        return Score(
            scored=True, overall=overall, sub_scores={"SC": sc, "PQ": pq, **measured, **raw}, reasoning=reasoning
        )

    def score(self, request: ScoreRequest) -> list[Score]:
        """One Score per edit, in order; all unscored when the instruction has no measurable target."""
        targets, why_not = parse_targets(request.instruction)
        if why_not is not None:
            return [Score.unscored(f"{why_not}: {quote(request.instruction)}") for _ in request.edits]
        size = self._working_size(request.source)
        src = _stats(request.source, size)
        return [self._score_edit(targets, src, _stats(edit, size)) for edit in request.edits]
