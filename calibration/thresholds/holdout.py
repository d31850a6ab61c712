"""The labelled parts that measure an operating point, and the check that they can support it.

``--holdout DIR`` in MVTec layout (``good/`` plus one folder per defect type) is the
labelled split; without it the calibration folder's unused images stand in for good
parts, and the calibration set itself as the last resort (its rates are then in-sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pouta.edge.contract.metadata import ModelMetadata

from ..calibset import ImageSet, list_images, load_image_set
from ..errors import CalibrationError
from .operating_point import defect_type
from .rules import check_enough

Log = Callable[[str], None]


@dataclass
class Holdout:
    """Labelled parts for the measured operating point (and the accuracy guard)."""

    good: ImageSet | None
    defect: ImageSet | None
    split: str  # the calibration set itself stands in when nothing was held out (in-sample)


def defect_types(images: ImageSet) -> list[str]:
    return [defect_type(p, images.folder) for p in images.files]


def check_objective(
    rule: str, target: float | None, confidence: float, n_normal: int, escape_defects: ImageSet | None
) -> None:
    """Refuse an objective the parts cannot support before minutes of conversion and scoring."""
    if rule == "target-false-reject" and target is not None:
        check_enough(n_normal, target, confidence, "--target-false-reject", "good calibration parts")
    if rule == "target-escape" and target is not None:
        if escape_defects is None:
            raise CalibrationError(
                "--target-escape needs labelled defect images (--defects DIR, or --holdout DIR with a "
                "good/ subfolder and one folder per defect type)"
            )
        check_enough(len(escape_defects), target, confidence, "--target-escape", "labelled defective parts")


def prepare_holdout(
    meta: ModelMetadata,
    normal: ImageSet,
    defects: ImageSet | None,
    holdout_dir: Path | None,
    objective: tuple[str, float | None, float],
    log: Log = print,
) -> Holdout:
    """The holdout, after checking that the parts can support the objective (rule, target,
    confidence) at all."""
    h_norm, h_def, split = holdout_sets(meta, normal, defects, holdout_dir, log)
    check_objective(*objective, len(normal), defects if defects is not None else h_def)
    return Holdout(h_norm, h_def, split)


def holdout_sets(
    meta: ModelMetadata,
    normal: ImageSet,
    defects: ImageSet | None,
    holdout_dir: Path | None,
    log: Log = print,
) -> tuple[ImageSet | None, ImageSet | None, str]:
    """(held-out normals, held-out defects, description).

    ``--holdout DIR`` with a ``good``/``normal`` subfolder is a labelled test split
    (MVTec layout: every other subfolder holds defects); without one, DIR holds normals
    and defects come from ``--defects``. Without ``--holdout`` the calibration folder's
    images that the sample did not use are the held-out normals.
    """
    pre = normal.preprocessor
    if holdout_dir is not None:
        good = next((holdout_dir / n for n in ("good", "normal") if (holdout_dir / n).is_dir()), None)
        if good is not None:
            h_norm = load_image_set(good, pre, n=None, min_images=1, what="held-out normal")
            bad_files = [p for p in list_images(holdout_dir, "held-out") if good not in p.parents]
            h_def = (
                load_image_set(
                    holdout_dir, pre, n=None, min_images=1, what="held-out defect", exclude=h_norm.files
                )
                if bad_files
                else None
            )
            return h_norm, h_def, f"{holdout_dir} (labelled split)"
        h_norm = load_image_set(holdout_dir, pre, n=None, min_images=1, what="held-out normal")
        return h_norm, defects, f"{holdout_dir} + defects"
    if normal.n_found > len(normal):
        rest = load_image_set(normal.folder, pre, n=None, min_images=1, exclude=normal.files)
        return rest, defects, "calibration images not in the sample + defects"
    log("no held-out normals (all calibration images were used); the guard reuses the calibration set")
    return normal, defects, "calibration set (not held out)"
