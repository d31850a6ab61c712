"""Replayed frames: image folders and glob patterns, video files, in-memory arrays.

Frames from disk carry their OK/NG label when the folder layout says so (``good``/``ok``
folders are good parts), so a replay can be scored like a labelled test set.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..contract.errors import ConfigError
from ..contract.preprocess import is_image_file, read_image
from ..postprocess import NG, OK
from .protocol import Frame, FrameTimeout, SourceBase, SourceError

GOOD_FOLDER_NAMES = frozenset({"good", "ok", "normal"})


def label_for(path: Path, root: Path | None) -> str | None:
    """OK for images under a ``good``/``ok`` folder, NG under any other sub-folder.

    Only images in sub-folders of the replayed root get a label: a flat folder of
    captures says nothing about the parts in it.
    """
    if root is None:
        return None
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    if len(rel.parts) < 2:
        return None
    return OK if rel.parts[-2].lower() in GOOD_FOLDER_NAMES else NG


def list_images(spec: str | os.PathLike[str]) -> tuple[list[Path], Path | None]:
    """A folder (recursive) or a glob pattern -> sorted image paths and the label root."""
    s = os.fspath(spec)
    p = Path(s)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q))
        root: Path | None = p
    elif any(ch in s for ch in "*?["):
        files = sorted(Path(q) for q in glob.glob(s, recursive=True) if is_image_file(q))
        root = None
    elif p.is_file():
        files, root = [p], None
    else:
        raise SourceError(f"{s}: image folder or pattern not found")
    if not files:
        raise SourceError(f"{s}: no image files found (expected one of .png .jpg .bmp .tif ...)")
    return files, root


class _Pacer:
    """Keeps a source at ``fps`` frames per second (no-op when fps is None/0)."""

    def __init__(self, fps: float | None) -> None:
        self.period = 1.0 / fps if fps else 0.0
        self.next = 0.0

    def wait(self, stop: threading.Event | None = None) -> None:
        if not self.period:
            return
        now = time.perf_counter()
        if self.next == 0.0:
            self.next = now
        delay = self.next - now
        if delay > 0:
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
        # A late frame does not cause a burst of catch-up frames.
        self.next = max(self.next, time.perf_counter() - self.period) + self.period


class ImageFolderSource(SourceBase):
    """Replays a folder (recursively) or glob of images as a camera."""

    def __init__(
        self,
        spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        fps: float | None = None,
        loop: bool = False,
        labels: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(spec, str | os.PathLike):
            self.files, root = list_images(spec)
            self.name = f"images:{os.fspath(spec)}"
        else:
            self.files, root = [Path(p) for p in spec], None
            self.name = "images"
        self.labels = [label_for(f, root) if labels else None for f in self.files]
        self.loop = loop
        self._pacer = _Pacer(fps)
        self._index = 0
        self._frame_id = 0

    def open(self) -> None:
        self._index = 0

    def read(self) -> Frame | None:
        if self._index >= len(self.files):
            if not self.loop:
                return None
            self._index = 0
        i = self._index
        self._index += 1
        self._pacer.wait(self.stop_event)
        path = self.files[i]
        frame_id = self._frame_id
        self._frame_id += 1
        image = read_image(path)  # ImageReadError -> skipped and counted by the pipeline
        return Frame(
            image=image,
            frame_id=frame_id,
            timestamp_ns=time.time_ns(),
            source=self.name,
            label=self.labels[i],
            path=str(path),
            color_order="BGR",
        )

    def close(self) -> None:
        pass


class ArraySource(SourceBase):
    """In-memory frames (benchmarks, tests): replays a list of images at ``fps``."""

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[str | None] | None = None,
        fps: float | None = None,
        count: int | None = None,
        name: str = "arrays",
    ) -> None:
        super().__init__()
        if not images:
            raise ConfigError("ArraySource: expected at least one image")
        self.images = list(images)
        self.labels = list(labels) if labels is not None else [None] * len(self.images)
        self.count = count if count is not None else len(self.images)
        self.name = name
        self._pacer = _Pacer(fps)
        self._n = 0

    def open(self) -> None:
        self._n = 0

    def read(self) -> Frame | None:
        if self._n >= self.count:
            return None
        self._pacer.wait(self.stop_event)
        i = self._n % len(self.images)
        self._n += 1
        return Frame(self.images[i], self._n - 1, time.time_ns(), self.name, self.labels[i])

    def close(self) -> None:
        pass


class VideoSource(SourceBase):
    """OpenCV ``VideoCapture``: a video file (``--video``) or a UVC/V4L2 camera (``--uvc``)."""

    def __init__(self, target: str | int, fps: float | None = None, loop: bool = False) -> None:
        super().__init__()
        self.target = target
        self.loop = loop and not isinstance(target, int)
        self.name = f"uvc:{target}" if isinstance(target, int) else f"video:{target}"
        self._pacer = _Pacer(fps)
        self._cap: object | None = None
        self._frame_id = 0

    def open(self) -> None:
        import cv2

        if not isinstance(self.target, int) and not Path(self.target).is_file():
            raise SourceError(f"{self.target}: video file not found")
        cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            raise SourceError(f"{self.name}: OpenCV cannot open this video/camera")
        self._cap = cap

    def read(self) -> Frame | None:
        cap = self._cap
        if cap is None:
            raise SourceError(f"{self.name}: read before open()")
        self._pacer.wait(self.stop_event)
        ok, image = cap.read()  # type: ignore[attr-defined]
        if not ok and self.loop:
            cap.set(1, 0)  # type: ignore[attr-defined]  # CAP_PROP_POS_FRAMES
            ok, image = cap.read()  # type: ignore[attr-defined]
        if not ok:
            if isinstance(self.target, int):
                raise FrameTimeout(f"{self.name}: no frame from camera")
            return None
        fid = self._frame_id
        self._frame_id += 1
        return Frame(image, fid, time.time_ns(), self.name)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()  # type: ignore[attr-defined]
            self._cap = None
