"""Model output -> verdict: image score vs threshold, defect mask, connected regions.

Components are found on the model-size map (cheap) and their boxes/areas mapped back
to source pixels through the same geometry as preprocessing (ROI + resize), so a PLC or
an operator gets coordinates in the camera image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from .contract.errors import ConfigError
from .contract.geometry import FrameGeometry
from .contract.metadata import Thresholds

# The verdict vocabulary of every record, file, register and message.
OK = "OK"
NG = "NG"
NOT_INSPECTED = "NOT_INSPECTED"  # the part was seen but not judged (dropped, corrupt, error)


@dataclass
class DefectRegion:
    """One connected defect region, in source-image pixels."""

    x: int
    y: int
    width: int
    height: int
    area: int
    max_score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verdict:
    verdict: str  # OK / NG
    score: float
    threshold: float
    pixel_threshold: float
    regions: list[DefectRegion] = field(default_factory=list)
    anomaly_map: np.ndarray | None = None  # work-size [h, w] (stitched when tiled), for overlays
    geometry: FrameGeometry | None = None  # how the map lies on the source frame

    @property
    def is_ng(self) -> bool:
        return self.verdict == NG

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "score": round(float(self.score), 6),
            "threshold": float(self.threshold),
            "pixel_threshold": float(self.pixel_threshold),
            "regions": [r.to_dict() for r in self.regions],
        }


class NonFiniteOutput(ValueError):
    """The model produced a NaN/inf score or map: no verdict can be earned from it."""


def check_threshold(field: str, value: object) -> float:
    """``value`` as a float if it is finite and inside the map's range [0, 1], else a one-line
    ``ConfigError`` naming ``field``. NaN compares False with every score, so a NaN threshold
    would pass every part; one above 1 could never be exceeded by a [0, 1] map."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: expected a number in [0, 1], got {value!r}") from None
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise ConfigError(f"{field}: expected a finite number in [0, 1] (the anomaly map's range), got {v}")
    return v


class PostProcessor:
    """Turns (anomaly_map [H,W], score) into a ``Verdict``.

    Fail-safe: a non-finite score or map raises ``NonFiniteOutput`` (the pipeline records
    the part ``NOT_INSPECTED``, reason ``non_finite_score``); ``score > threshold`` alone
    would call a NaN score OK.
    """

    def __init__(
        self,
        thresholds: Thresholds | None,
        min_area: int = 16,
        max_regions: int = 32,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        border_margin: int = 0,
    ) -> None:
        img_t = image_threshold if image_threshold is not None else (thresholds.image if thresholds else None)
        pix_t = pixel_threshold if pixel_threshold is not None else (thresholds.pixel if thresholds else None)
        if img_t is None or pix_t is None:
            raise ConfigError(
                "thresholds: the model's metadata has none; calibrate the model or set "
                "postprocess.image_threshold and postprocess.pixel_threshold"
            )
        where = "the model's sidecar thresholds"
        self.image_threshold = check_threshold(
            "postprocess.image_threshold" if image_threshold is not None else f"{where}.image", img_t
        )
        self.pixel_threshold = check_threshold(
            "postprocess.pixel_threshold" if pixel_threshold is not None else f"{where}.pixel", pix_t
        )
        self.min_area = int(min_area)
        self.max_regions = int(max_regions)
        if border_margin < 0:
            raise ConfigError(f"postprocess.border_margin: expected >= 0 source pixels, got {border_margin}")
        self.border_margin = int(border_margin)

    def regions(self, amap: np.ndarray, geometry: FrameGeometry) -> list[DefectRegion]:
        """Connected regions of the work-size map above the pixel threshold, in source pixels."""
        mask = amap > self.pixel_threshold
        ox, oy, sx, sy = geometry.source_scale()
        if self.border_margin:
            # Fixture edges and the part's silhouette light up the map at the image border;
            # a margin (source pixels) keeps them out of the regions.
            my = min(mask.shape[0], int(np.ceil(self.border_margin / sy)))
            mx = min(mask.shape[1], int(np.ceil(self.border_margin / sx)))
            mask[:my], mask[mask.shape[0] - my :] = False, False
            mask[:, :mx], mask[:, mask.shape[1] - mx :] = False, False
        if not mask.any():
            return []
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        out: list[DefectRegion] = []
        for i in range(1, n):
            x, y, w, h, area = (int(v) for v in stats[i])
            src_area = round(area * sx * sy)
            if src_area < self.min_area:
                continue
            peak = float(amap[y : y + h, x : x + w][labels[y : y + h, x : x + w] == i].max())
            out.append(
                DefectRegion(
                    x=int(ox + x * sx),
                    y=int(oy + y * sy),
                    width=max(1, round(w * sx)),
                    height=max(1, round(h * sy)),
                    area=src_area,
                    max_score=round(peak, 6),
                )
            )
        out.sort(key=lambda r: r.area, reverse=True)
        return out[: self.max_regions]

    def __call__(self, tile_maps: np.ndarray, tile_scores: np.ndarray, geometry: FrameGeometry) -> Verdict:
        """Backend outputs for one frame's inputs (``geometry.n_tiles`` of them) -> verdict."""
        a = geometry.stitch(tile_maps)
        s = geometry.image_score(a, tile_scores)
        if not (math.isfinite(s) and np.isfinite(a).all()):
            raise NonFiniteOutput(f"the model's output is not finite (score {s})")
        ng = s > self.image_threshold
        return Verdict(
            verdict=NG if ng else OK,
            score=s,
            threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            # An OK part has no defects to locate: regions are what made it NG.
            regions=self.regions(a, geometry) if ng else [],
            anomaly_map=a,
            geometry=geometry,
        )
