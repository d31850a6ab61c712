"""Calibration and build steps shared by ``pouta-calibrate`` and ``pouta-build-engine``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pouta.edge.backends.onnx_runtime import OnnxRuntimeBackend
from pouta.edge.contract.fsutil import atomic_write_json, sha256_file
from pouta.edge.contract.metadata import (
    ModelMetadata,
    Thresholds,
    load_for_model,
    metadata_path,
    operating_point_line,
)
from pouta.edge.contract.preprocess import preprocessor_for

from .artifacts.fp16 import FP16_SUFFIX, convert_to_fp16
from .artifacts.guard import GuardReport, check_share, compare
from .artifacts.quantize import CPU_SUFFIX, DEFAULT_CALIB_METHOD, TRT_SUFFIX, artifact_path, quantize_pair
from .calibset import (
    DEFAULT_MIN_IMAGES,
    DEFAULT_N_CALIB,
    DEFAULT_SYNTHETIC_FRACTION,
    ImageSet,
    ImageSetReader,
    load_image_set,
)
from .errors import CalibrationError
from .scoring import score_set
from .thresholds.holdout import Holdout, defect_types, prepare_holdout
from .thresholds.operating_point import HeldOut, measure
from .thresholds.plots import save_score_histogram
from .thresholds.report import write_report
from .thresholds.rules import (
    DEFAULT_CONFIDENCE,
    DEFAULT_IMAGE_RULE,
    DEFAULT_IQR_K,
    DEFAULT_MARGIN,
    DEFAULT_PIXEL_QUANTILE,
    DEFAULT_QUANTILE,
    calibrate_thresholds,
    check_target,
)

Log = Callable[[str], None]


@dataclass
class ThresholdOptions:
    rule: str = DEFAULT_IMAGE_RULE
    margin: float = DEFAULT_MARGIN
    quantile: float = DEFAULT_QUANTILE
    iqr_k: float = DEFAULT_IQR_K
    pixel_rule: str = "normal-quantile"
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE
    pixel_value: float = 0.5
    target_false_reject: float | None = None
    target_escape: float | None = None
    confidence: float = DEFAULT_CONFIDENCE

    def objective(self) -> tuple[str, float | None]:
        """(image rule, target rate): a target flag chooses its own rule."""
        if self.target_false_reject is not None and self.target_escape is not None:
            raise CalibrationError("--target-false-reject and --target-escape: give one objective, not both")
        if self.target_false_reject is not None:
            check_target(self.target_false_reject, self.confidence, "--target-false-reject")
            return "target-false-reject", self.target_false_reject
        if self.target_escape is not None:
            check_target(self.target_escape, self.confidence, "--target-escape")
            return "target-escape", self.target_escape
        return self.rule, None


@dataclass
class CalibOptions:
    calib_dir: Path
    defects_dir: Path | None = None
    n_calib: int = DEFAULT_N_CALIB
    min_calib: int = DEFAULT_MIN_IMAGES
    seed: int = 0
    batch_size: int = 8
    thresholds: ThresholdOptions = field(default_factory=ThresholdOptions)


def _skip_logger(log: Log) -> Callable[[Path, str], None]:
    return lambda path, reason: log(f"skipped: {reason}")


def load_sets(meta: ModelMetadata, opts: CalibOptions, log: Log = print) -> tuple[ImageSet, ImageSet | None]:
    pre = preprocessor_for(meta)
    normal = load_image_set(
        opts.calib_dir,
        pre,
        n=opts.n_calib,
        seed=opts.seed,
        min_images=opts.min_calib,
        on_skip=_skip_logger(log),
    )
    log(
        f"calibration set: {len(normal)} of {normal.n_found} images from {opts.calib_dir} "
        f"({len(normal.skipped)} unreadable skipped)"
    )
    defects = None
    if opts.defects_dir is not None:
        defects = load_image_set(
            opts.defects_dir, pre, n=None, min_images=1, what="defect", on_skip=_skip_logger(log)
        )
        log(f"defect set: {len(defects)} images from {opts.defects_dir}")
    return normal, defects


@dataclass
class Calibrated:
    thresholds: Thresholds
    normal: np.ndarray
    defect: np.ndarray
    held: HeldOut | None = None  # this artifact's scores of the holdout


def calibrate_artifact(
    artifact: str | os.PathLike[str],
    meta: ModelMetadata,
    normal: ImageSet,
    defects: ImageSet | None,
    opts: ThresholdOptions,
    batch_size: int = 8,
    histogram: str | os.PathLike[str] | None = None,
    log: Log = print,
    holdout: Holdout | None = None,
) -> Calibrated:
    """Score ``artifact`` itself (through the runtime backend), choose its thresholds and, with
    a holdout, measure the operating point they give.

    ``--target-escape`` without ``--defects`` chooses on the holdout's defects; their measured
    escape rate is then marked in-sample."""
    artifact = Path(artifact)
    backend = OnnxRuntimeBackend(artifact, metadata=meta)
    rule, target = opts.objective()

    def score(images: ImageSet, what: str, pixels: bool = False) -> Any:
        log(f"scoring {len(images)} {what} images with {artifact.name} ...")
        return score_set(backend, images, batch_size, collect_pixels=pixels)

    n = score(normal, "normal", pixels=True)
    h_good = h_def = None
    if holdout is not None and holdout.good is not None:
        h_good = n.scores if holdout.good is normal else score(holdout.good, "held-out normal").scores
    if holdout is not None and holdout.defect is not None:
        h_def = score(holdout.defect, "held-out defect").scores
    # Without --holdout the --defects set is also the held-out one: score it once.
    shared = holdout is not None and defects is not None and holdout.defect is defects
    d = np.zeros(0)
    if defects is not None:
        d = h_def if shared and h_def is not None else score(defects, "defect").scores
    elif rule == "target-escape" and h_def is not None:
        d = h_def
    defects_chose = rule in ("target-escape", "f1-optimal") and (shared or (defects is None and d.size > 0))
    t = opts
    thresholds = calibrate_thresholds(
        n.scores,
        d if d.size else None,
        n.pixels,
        rule=rule,
        margin=t.margin,
        quantile=t.quantile,
        iqr_k=t.iqr_k,
        pixel_rule=t.pixel_rule,
        pixel_quantile=t.pixel_quantile,
        pixel_value=t.pixel_value,
        scored_with=artifact.name,
        target=target,
        confidence=t.confidence,
    )
    held = None
    if holdout is not None and (h_good is not None or h_def is not None):
        held = HeldOut(
            good=h_good if h_good is not None else np.zeros(0),
            defect=h_def if h_def is not None else np.zeros(0),
            defect_types=defect_types(holdout.defect) if holdout.defect is not None else [],
            split=holdout.split,
            good_files=list(holdout.good.files) if holdout.good is not None else [],
            defect_files=list(holdout.defect.files) if holdout.defect is not None else [],
            good_in_sample=holdout.good is normal,
            defect_in_sample=defects_chose,
        )
        thresholds.operating_point["measured"] = measure(thresholds.image, held, t.confidence)
        _, page = write_report(artifact, thresholds, n.scores, held)
        thresholds.operating_point["report"] = page.name
        log(f"{artifact.name}: operating-point report {page}")
    if histogram is not None:
        save_score_histogram(histogram, n.scores, thresholds.image, d, title=f"{artifact.name}: {rule}")
    log(
        f"{artifact.name}: image threshold {thresholds.image:.5g} ({rule}), pixel threshold {thresholds.pixel:.4g}"
    )
    line = operating_point_line(thresholds)
    if line:
        log(f"{artifact.name}: {line}")
    return Calibrated(thresholds, n.scores, d, held)


def _objective(t: ThresholdOptions) -> tuple[str, float | None, float]:
    rule, target = t.objective()
    return rule, target, t.confidence


def calibration_record(normal: ImageSet, method: str | None, **extra: Any) -> dict[str, Any]:
    rec = normal.describe()
    if method is not None:
        rec["method"] = method
    rec.update(extra)
    return rec


def write_sidecar(
    parent: ModelMetadata,
    parent_path: Path,
    artifact: Path,
    precision: str,
    thresholds: Thresholds,
    calibration: dict[str, Any],
    build: dict[str, Any],
) -> Path:
    meta = parent.derive(
        precision=precision,
        thresholds=thresholds,
        parent_artifact=parent_path.name,
        artifact_sha256=sha256_file(artifact),
        calibration=calibration,
        build=build,
        created_utc="",
        versions={},
    )
    return meta.save(metadata_path(artifact))


def calibrate_model(
    model: str | os.PathLike[str], opts: CalibOptions, log: Log = print, holdout_dir: Path | None = None
) -> Thresholds:
    """``pouta-calibrate``: thresholds for ``model`` written into its own sidecar."""
    model = Path(model)
    if not model.is_file():
        raise CalibrationError(f"{model}: model file not found")
    meta = load_for_model(model)
    normal, defects = load_sets(meta, opts, log)
    holdout = prepare_holdout(meta, normal, defects, holdout_dir, _objective(opts.thresholds), log)
    hist = model.with_name(model.name + ".scores.png")
    thresholds = calibrate_artifact(
        model, meta, normal, defects, opts.thresholds, opts.batch_size, hist, log, holdout
    ).thresholds
    meta.thresholds = thresholds
    meta.calibration = {**meta.calibration, "thresholds": calibration_record(normal, None)}
    meta.save(metadata_path(model))
    log(f"wrote thresholds to {metadata_path(model)}; histogram {hist}")
    return thresholds


@dataclass
class PortableResult:
    artifacts: dict[str, Path]  # precision tag -> path ("fp32", "fp16", "int8-cpu", "int8-trt")
    thresholds: dict[str, Thresholds]
    guard: GuardReport | None = None


def build_portable(
    model: str | os.PathLike[str],
    opts: CalibOptions,
    fp16: bool = True,
    int8: bool = True,
    calib_method: str = DEFAULT_CALIB_METHOD,
    synthetic_fraction: float = DEFAULT_SYNTHETIC_FRACTION,
    cpu_format: str = "qdq",
    holdout_dir: Path | None = None,
    max_auroc_drop: float | None = None,
    report_path: Path | None = None,
    log: Log = print,
    max_flip_rate: float | None = None,
) -> PortableResult:
    """FP16 ONNX, INT8 CPU ONNX and INT8 TensorRT Q/DQ ONNX, each with calibrated thresholds."""
    model = Path(model)
    if not model.is_file():
        raise CalibrationError(f"{model}: model file not found")
    check_share(max_flip_rate, "--max-flip-rate")  # before minutes of work, not after
    meta = load_for_model(model)
    normal, defects = load_sets(meta, opts, log)
    holdout = prepare_holdout(meta, normal, defects, holdout_dir, _objective(opts.thresholds), log)
    arts: dict[str, Path] = {"fp32": model}
    builds: dict[str, dict[str, Any]] = {}
    calibs: dict[str, dict[str, Any]] = {}
    if fp16:
        log("converting to FP16 ...")
        p = convert_to_fp16(model, artifact_path(model, FP16_SUFFIX))
        arts["fp16"] = p
        builds["fp16"] = {"format": "onnx-fp16", "converter": "onnxconverter-common", "io": "fp32"}
        calibs["fp16"] = calibration_record(normal, None)
    if int8:
        log(
            f"INT8 calibration ({calib_method}, {len(normal)} images, {synthetic_fraction:.0%} synthetic defects) ..."
        )
        reader = ImageSetReader(normal, synthetic_fraction=synthetic_fraction, seed=opts.seed)
        results = quantize_pair(
            model,
            reader,
            trt_out=artifact_path(model, TRT_SUFFIX),
            cpu_out=artifact_path(model, CPU_SUFFIX),
            method=calib_method,
            cpu_format=cpu_format,
        )
        for r in results:
            tag = "int8-trt" if r.target == "tensorrt" else "int8-cpu"
            arts[tag] = r.path
            builds[tag] = r.describe()
            calibs[tag] = calibration_record(normal, calib_method, synthetic_fraction=synthetic_fraction)
    thresholds: dict[str, Thresholds] = {}
    held_scores: dict[str, np.ndarray] = {}
    for tag, path in arts.items():
        hist = path.with_name(path.name + ".scores.png")
        cal = calibrate_artifact(
            path, meta, normal, defects, opts.thresholds, opts.batch_size, hist, log, holdout
        )
        thr = thresholds[tag] = cal.thresholds
        if cal.held is not None:
            held_scores[tag] = np.concatenate([cal.held.good, cal.held.defect])
        if tag == "fp32":
            continue
        precision = "fp16" if tag == "fp16" else "int8"
        write_sidecar(meta, model, path, precision, thr, calibs[tag], builds[tag])
        log(f"wrote {path} (+ {metadata_path(path).name})")
    result = PortableResult(arts, thresholds)
    if holdout.good is not None and len(arts) > 1:
        result.guard = run_guard(
            meta,
            arts,
            thresholds,
            holdout.good,
            holdout.defect,
            holdout.split,
            max_auroc_drop,
            batch_size=opts.batch_size,
            log=log,
            max_flip_rate=max_flip_rate,
            scores=held_scores,
        )
        if report_path is not None:
            atomic_write_json(report_path, result.guard.to_dict(), fsync=False)
    return result


def run_guard(
    meta: ModelMetadata,
    arts: dict[str, Path],
    thresholds: dict[str, Thresholds],
    normal: ImageSet,
    defects: ImageSet | None,
    split: str,
    max_auroc_drop: float | None,
    batch_size: int = 8,
    log: Log = print,
    max_flip_rate: float | None = None,
    scores: dict[str, np.ndarray] | None = None,
) -> GuardReport:
    """FP32 vs every artifact on the holdout; ``scores`` (normals then defects, per tag) are
    reused where the operating point already scored them."""
    log(
        f"accuracy guard on {len(normal)} normal + {len(defects) if defects else 0} defect held-out images ..."
    )
    scores = dict(scores or {})
    for tag, path in arts.items():
        if tag in scores:
            continue
        backend = OnnxRuntimeBackend(path, metadata=meta)
        parts = [score_set(backend, normal, batch_size).scores]
        if defects is not None:
            parts.append(score_set(backend, defects, batch_size).scores)
        scores[tag] = np.concatenate(parts)
    labels = np.concatenate([np.zeros(len(normal), bool), np.ones(len(defects) if defects else 0, bool)])
    candidates = [
        (arts[tag].name, "fp16" if tag == "fp16" else "int8", scores[tag], thresholds[tag].image)
        for tag in arts
        if tag != "fp32"
    ]
    return compare(
        labels,
        scores["fp32"],
        thresholds["fp32"].image,
        candidates,
        max_auroc_drop,
        split,
        max_flip_rate=max_flip_rate,
    )
