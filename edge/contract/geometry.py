"""Frame geometry: the ROI, the work image, its tiles, and the way back to source pixels.

One ``FrameGeometry`` per frame, produced by ``Preprocessor.geometry``: preprocessing
cuts the model inputs with it, and stitching, the image score, regions, overlays and
sinks map the anomaly map back through it. Tiled models (``Tiling``) rescale the frame by
``scale`` (aspect kept) and cut it into overlapping model-size tiles that run as one
batch; their maps are stitched back, weighted towards tile centres where tiles overlap,
and the image score is the 21x21 average-pooled max of the stitched map, as the graph
computes it per input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import ConfigError
from .metadata import SCORE_POOL_SIZE


@dataclass(frozen=True)
class Roi:
    """Region of interest in source pixels: x, y (top-left), width, height."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, value: Sequence[int] | str | None) -> Roi | None:
        if value is None or value == "" or value == []:
            return None
        parts = [p for p in value.replace(",", " ").split() if p] if isinstance(value, str) else list(value)
        try:
            x, y, w, h = (int(p) for p in parts)
        except (TypeError, ValueError):
            raise ConfigError(f"roi: expected 'x,y,width,height' integers, got {value!r}") from None
        if w <= 0 or h <= 0 or x < 0 or y < 0:
            raise ConfigError(f"roi: expected x,y >= 0 and width,height > 0, got {value!r}")
        return cls(x, y, w, h)

    def clip_to(self, height: int, width: int) -> Roi:
        if self.x >= width or self.y >= height:
            raise ValueError(f"roi {self} lies outside the {width}x{height} image")
        return Roi(self.x, self.y, min(self.width, width - self.x), min(self.height, height - self.y))


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``length`` px, evenly spread.

    Neighbours share at least ``overlap`` of a tile; the first tile starts at 0 and the
    last ends at ``length`` (a work image shorter than a tile is padded to one tile).
    """
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return [round(k * (length - tile) / (n - 1)) for k in range(n)]


@dataclass(frozen=True)
class Tiling:
    """Tiled inference: the image rescaled by ``scale`` (aspect kept), cut into model-size tiles."""

    scale: float  # work pixels per source pixel (of the ROI)
    overlap: float = 0.25  # fraction of a tile shared with its neighbour

    def __post_init__(self) -> None:
        if not 0.0 < self.scale <= 4.0:
            raise ConfigError(f"tiling.scale: expected a value in (0, 4], got {self.scale}")
        if not 0.0 <= self.overlap < 0.9:
            raise ConfigError(f"tiling.overlap: expected a value in [0, 0.9), got {self.overlap}")

    def work_size(self, height: int, width: int) -> tuple[int, int]:
        return max(1, round(height * self.scale)), max(1, round(width * self.scale))

    def origins(self, work_hw: tuple[int, int], tile_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        ys = tile_origins(work_hw[0], tile_hw[0], self.overlap)
        xs = tile_origins(work_hw[1], tile_hw[1], self.overlap)
        return tuple((y, x) for y in ys for x in xs)


def _blend_window(length: int, ramp: int) -> np.ndarray:
    """1 in the middle, falling linearly to 0.05 over ``ramp`` px at both ends."""
    t = np.arange(length, dtype=np.float32)
    edge = np.minimum(t + 0.5, length - 0.5 - t) / max(1, ramp)
    return np.clip(edge, 0.05, 1.0)


@dataclass(frozen=True)
class FrameGeometry:
    """One frame's geometry: source size, ROI, work size, tile size and tile origins.

    Produced by ``Preprocessor.geometry``; every consumer (stitching, image score,
    regions, overlays, sinks) maps between model, work and source pixels through it.
    """

    source_hw: tuple[int, int]
    roi: Roi
    work_hw: tuple[int, int]
    tile_hw: tuple[int, int]
    origins: tuple[tuple[int, int], ...]

    @property
    def tiled(self) -> bool:
        return len(self.origins) > 1 or self.work_hw != self.tile_hw

    @property
    def n_tiles(self) -> int:
        return len(self.origins)

    @property
    def _padded_hw(self) -> tuple[int, int]:
        return max(self.work_hw[0], self.tile_hw[0]), max(self.work_hw[1], self.tile_hw[1])

    def cut(self, work: np.ndarray) -> np.ndarray:
        """Work image [3, h, w] -> tiles [N, 3, H, W] (reflect-padded up to one tile)."""
        if not self.tiled:
            return work[None]
        ph, pw = self._padded_hw
        h, w = self.work_hw
        if (ph, pw) != (h, w):
            work = np.pad(work, ((0, 0), (0, ph - h), (0, pw - w)), mode="reflect" if h > 1 < w else "edge")
        th, tw = self.tile_hw
        return np.ascontiguousarray(np.stack([work[:, y : y + th, x : x + tw] for y, x in self.origins]))

    def stitch(self, maps: np.ndarray) -> np.ndarray:
        """Tile maps [N, H, W] (or [N, 1, H, W]) -> work-size map [h, w], blended where tiles overlap."""
        maps = np.asarray(maps, dtype=np.float32).reshape(self.n_tiles, *self.tile_hw)
        if not self.tiled:
            return maps[0]
        th, tw = self.tile_hw
        ph, pw = self._padded_hw
        wy = _blend_window(th, th // 4)
        wx = _blend_window(tw, tw // 4)
        weight = wy[:, None] * wx[None, :]
        acc = np.zeros((ph, pw), np.float32)
        norm = np.zeros((ph, pw), np.float32)
        for (y, x), m in zip(self.origins, maps, strict=True):
            acc[y : y + th, x : x + tw] += m * weight
            norm[y : y + th, x : x + tw] += weight
        h, w = self.work_hw
        return acc[:h, :w] / norm[:h, :w]

    def image_score(self, work_map: np.ndarray, tile_scores: np.ndarray) -> float:
        """The frame's score: the graph's own score for one whole-image input, else the pooled max."""
        if not self.tiled:
            return float(np.asarray(tile_scores).reshape(-1)[0])
        return pooled_max(work_map)

    def to_source(self, work_map: np.ndarray) -> np.ndarray:
        """Work-size map -> source-size map (zeros outside the ROI)."""
        sh, sw = self.source_hw
        r = self.roi
        resized = cv2.resize(work_map, (r.width, r.height), interpolation=cv2.INTER_LINEAR)
        if (r.x, r.y, r.width, r.height) == (0, 0, sw, sh):
            return resized
        out = np.zeros((sh, sw), dtype=work_map.dtype)
        out[r.y : r.y + r.height, r.x : r.x + r.width] = resized
        return out

    def source_scale(self) -> tuple[float, float, float, float]:
        """(x offset, y offset, source px per work px in x, in y): work -> source mapping."""
        r = self.roi
        return r.x, r.y, r.width / self.work_hw[1], r.height / self.work_hw[0]


RunInputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def score_frames(
    run: RunInputs, frames: Iterable[tuple[np.ndarray, FrameGeometry]], max_batch: int = 8
) -> Iterator[tuple[np.ndarray, float]]:
    """(work-size map, image score) per frame, in order, for (work image, geometry) pairs.

    ``run`` maps a [N,3,H,W] batch to (maps [N,1,H,W] or [N,H,W], scores [N]): a backend,
    an ONNX session or a torch model. Whole-image frames share calls of up to
    ``max_batch`` inputs; a tiled frame's tiles run together, in chunks of ``max_batch``.
    Evaluation and calibration score through here; the runtime does the same per frame.
    """
    pending: list[tuple[np.ndarray, FrameGeometry]] = []

    def flush() -> Iterator[tuple[np.ndarray, float]]:
        x = np.concatenate([geo.cut(work) for work, geo in pending])
        maps, scores = [], []
        tile_hw = pending[0][1].tile_hw
        for k in range(0, len(x), max_batch):
            chunk = np.ascontiguousarray(x[k : k + max_batch])
            m, sc = (np.asarray(v, np.float32) for v in run(chunk))
            n = len(chunk)
            if m.size != n * tile_hw[0] * tile_hw[1] or m.shape[0] != n or sc.size != n:
                raise ValueError(
                    f"model output: expected maps [N,1,{tile_hw[0]},{tile_hw[1]}] and scores [N] for "
                    f"N={n} inputs, got maps {list(m.shape)} and scores {list(sc.shape)}"
                )
            maps.append(m.reshape(n, *tile_hw))
            scores.append(sc.reshape(n))
        all_maps, all_scores = np.concatenate(maps), np.concatenate(scores)
        k = 0
        for _, geo in pending:
            work_map = geo.stitch(all_maps[k : k + geo.n_tiles])
            yield work_map, geo.image_score(work_map, all_scores[k : k + geo.n_tiles])
            k += geo.n_tiles
        pending.clear()

    for work, geo in frames:
        pending.append((work, geo))
        if geo.tiled or len(pending) >= max_batch:
            yield from flush()
    if pending:
        yield from flush()


def pooled_max(work_map: np.ndarray, size: int = SCORE_POOL_SIZE) -> float:
    """Max of the ``size`` x ``size`` stride-1 average pool, zeros padded and counted.

    The same statistic the exported graph computes per input (DRAEM's image score).
    """
    m = np.asarray(work_map, dtype=np.float32)
    pooled = cv2.boxFilter(m, -1, (size, size), normalize=True, borderType=cv2.BORDER_CONSTANT)
    return float(pooled.max())
