"""Model output -> verdict: image score vs threshold, defect mask, connected regions.

Components are found on the model-size map (cheap) and their boxes/areas mapped back
to source pixels through the same geometry as preprocessing (ROI + resize), so a PLC or
an operator gets coordinates in the camera image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from .errors import ConfigError
from .metadata import Thresholds
from .preprocess import Preprocessor

OK = "OK"
NG = "NG"


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
    anomaly_map: np.ndarray | None = None  # model-size [H, W], for overlays

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


class PostProcessor:
    """Turns (anomaly_map [H,W], score) into a ``Verdict``."""

    def __init__(
        self,
        thresholds: Thresholds | None,
        preprocessor: Preprocessor,
        min_area: int = 0,
        max_regions: int = 32,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
    ) -> None:
        img_t = image_threshold if image_threshold is not None else (thresholds.image if thresholds else None)
        pix_t = pixel_threshold if pixel_threshold is not None else (thresholds.pixel if thresholds else None)
        if img_t is None or pix_t is None:
            raise ConfigError(
                "thresholds: the model's metadata has none; calibrate the model or set "
                "postprocess.image_threshold and postprocess.pixel_threshold"
            )
        self.image_threshold = float(img_t)
        self.pixel_threshold = float(pix_t)
        self.pre = preprocessor
        self.min_area = int(min_area)
        self.max_regions = int(max_regions)

    def _scale(self, source_shape: tuple[int, ...]) -> tuple[float, float, float, float]:
        sh, sw = int(source_shape[0]), int(source_shape[1])
        if self.pre.roi is None:
            ox, oy, rw, rh = 0, 0, sw, sh
        else:
            r = self.pre.roi.clip_to(sh, sw)
            ox, oy, rw, rh = r.x, r.y, r.width, r.height
        return ox, oy, rw / self.pre.width, rh / self.pre.height

    def regions(self, amap: np.ndarray, source_shape: tuple[int, ...]) -> list[DefectRegion]:
        mask = amap > self.pixel_threshold
        if not mask.any():
            return []
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        ox, oy, sx, sy = self._scale(source_shape)
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

    def __call__(self, amap: np.ndarray, score: float, source_shape: tuple[int, ...]) -> Verdict:
        a = np.asarray(amap, dtype=np.float32).reshape(self.pre.height, self.pre.width)
        s = float(score)
        return Verdict(
            verdict=NG if s > self.image_threshold else OK,
            score=s,
            threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            regions=self.regions(a, source_shape),
            anomaly_map=a,
        )
