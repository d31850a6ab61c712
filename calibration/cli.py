"""``pouta-calibrate`` and ``pouta-build-engine`` command lines.

Every user-fixable problem ends as one line on stderr and exit status 2; a failed
accuracy guard exits 3, so a CI job can tell "bad input" from "INT8 too lossy".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pouta.edge.contract.errors import PoutaError
from pouta.edge.contract.metadata import ModelMetadata, load_for_model, metadata_path
from pouta.edge.contract.preprocess import preprocessor_for, read_image
from pouta.edge.contract.settings import add_config_args, dump, resolve_namespace

from .artifacts.guard import WARN_FLIP_RATE
from .artifacts.quantize import CALIB_METHODS, DEFAULT_CALIB_METHOD
from .calibset import DEFAULT_MIN_IMAGES, DEFAULT_N_CALIB, DEFAULT_SYNTHETIC_FRACTION, list_images
from .engines.tensorrt import (
    DEFAULT_WORKSPACE_MB,
    BuildRequest,
    build_engine,
    plan_build,
    tensorrt_version,
    trtexec_command,
)
from .errors import CalibrationError
from .steps import CalibOptions, ThresholdOptions, build_portable, calibrate_model, write_sidecar
from .thresholds.rules import (
    DEFAULT_CONFIDENCE,
    DEFAULT_IMAGE_RULE,
    DEFAULT_IQR_K,
    DEFAULT_MARGIN,
    DEFAULT_PIXEL_QUANTILE,
    DEFAULT_QUANTILE,
    IMAGE_RULES,
    PIXEL_RULES,
)

EXIT_USAGE = 2
EXIT_GUARD = 3


def _log(msg: str) -> None:
    print(msg, flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    add_config_args(p, config_file=True)
    p.add_argument("model", type=Path, help="FP32 ONNX model with its <model>.json sidecar")
    p.add_argument(
        "--calib",
        type=Path,
        required=True,
        help="folder of normal (good) images, searched recursively (not a calibration cache file as "
        "trtexec's --calib is)",
    )
    p.add_argument("--defects", type=Path, help="folder of known defective images (f1-optimal rule, guard)")
    p.add_argument("--n-calib", type=int, default=DEFAULT_N_CALIB, help="images sampled from --calib")
    p.add_argument("--min-calib", type=int, default=DEFAULT_MIN_IMAGES, help="fewest usable images accepted")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same set)")
    p.add_argument("--batch", type=int, default=8, help="scoring batch size")
    p.add_argument("--rule", "--threshold-rule", dest="rule", choices=IMAGE_RULES, default=DEFAULT_IMAGE_RULE)
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="normal-max-margin factor")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE, help="normal-quantile q")
    p.add_argument("--iqr-k", type=float, default=DEFAULT_IQR_K, help="normal-quantile: add k * IQR")
    p.add_argument(
        "--target-false-reject",
        type=float,
        metavar="P",
        help="choose the threshold so that at most this share of good parts is rejected (0.005 = 0.5%%) "
        "with --confidence; needs enough good --calib parts and says how many",
    )
    p.add_argument(
        "--target-escape",
        type=float,
        metavar="Q",
        help="instead: at most this share of defective parts passes, with --confidence "
        "(chosen on --defects, else on the labelled --holdout's defects)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help="confidence of the target bound and of the measured rates' intervals",
    )
    p.add_argument(
        "--holdout",
        type=Path,
        help="held-out normals, or a labelled split with a good/ subfolder (MVTec test/): measures "
        "false rejects and escapes per defect type at the chosen threshold",
    )
    p.add_argument("--pixel-rule", choices=PIXEL_RULES, default="normal-quantile")
    p.add_argument("--pixel-quantile", type=float, default=DEFAULT_PIXEL_QUANTILE)
    p.add_argument("--pixel-value", type=float, default=0.5, help="pixel threshold for --pixel-rule fixed")


def _calib_options(a: argparse.Namespace) -> CalibOptions:
    return CalibOptions(
        calib_dir=a.calib,
        defects_dir=a.defects,
        n_calib=a.n_calib,
        min_calib=a.min_calib,
        seed=a.seed,
        batch_size=a.batch,
        thresholds=ThresholdOptions(
            rule=a.rule,
            margin=a.margin,
            quantile=a.quantile,
            iqr_k=a.iqr_k,
            pixel_rule=a.pixel_rule,
            pixel_quantile=a.pixel_quantile,
            pixel_value=a.pixel_value,
            target_false_reject=a.target_false_reject,
            target_escape=a.target_escape,
            confidence=a.confidence,
        ),
    )


def calibrate_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pouta-calibrate", description="Calibrate a model's pass/fail thresholds on normal images."
    )
    _common(p)
    a = p.parse_args(argv)
    try:
        settings = resolve_namespace(p, a)
        if a.print_config:
            print(dump(settings), end="")
            return 0
        calibrate_model(a.model, _calib_options(a), _log, holdout_dir=a.holdout)
    except PoutaError as exc:
        print(f"pouta-calibrate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def build_engine_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pouta-build-engine",
        description="Write FP16/INT8 ONNX artifacts with calibrated thresholds and, with TensorRT, a plan.",
    )
    _common(p)
    p.add_argument("--fp16", action="store_true", help="FP16 artifact / engine")
    p.add_argument("--int8", action="store_true", help="INT8 artifacts / engine")
    p.add_argument("--calib-method", choices=sorted(CALIB_METHODS), default=DEFAULT_CALIB_METHOD)
    p.add_argument(
        "--synthetic-fraction",
        type=float,
        default=DEFAULT_SYNTHETIC_FRACTION,
        help="share of INT8 calibration inputs given a synthetic defect (keeps defect activations in range)",
    )
    p.add_argument("--cpu-format", choices=("qdq", "qoperator"), default="qdq", help="CPU INT8 file format")
    p.add_argument(
        "--max-auroc-drop", type=float, help="fail when an artifact loses more image AUROC than this"
    )
    p.add_argument(
        "--max-flip-rate",
        type=float,
        help="fail when an artifact changes more than this share (0-1) of the held-out verdicts; "
        f"without it, over {WARN_FLIP_RATE * 100:.0f}%% only warns",  # %% : argparse formats help
    )
    # Second spellings are trtexec's, accepted where the meaning is the same.
    p.add_argument(
        "-o",
        "--output",
        "--saveEngine",
        dest="output",
        type=Path,
        help="TensorRT plan path (default <model>.<precision>.plan)",
    )
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB)
    p.add_argument(
        "--timing-cache",
        "--timingCacheFile",
        dest="timing_cache",
        type=Path,
        help="TensorRT timing cache, loaded if present and saved",
    )
    p.add_argument(
        "--dla-core",
        "--useDLACore",
        dest="dla_core",
        type=int,
        help="build for this DLA core (GPU fallback on)",
    )
    p.add_argument(
        "--version-compatible", "--versionCompatible", dest="version_compatible", action="store_true"
    )
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=1)
    a = p.parse_args(argv)
    try:
        settings = resolve_namespace(p, a)
    except PoutaError as exc:
        print(f"pouta-build-engine: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not (a.fp16 or a.int8):
        a.fp16 = a.int8 = True  # nothing asked: make every portable artifact
    if a.print_config:
        print(dump({**settings, "fp16": a.fp16, "int8": a.int8}), end="")
        return 0
    try:
        stem = a.model.name[: -len(".onnx")] if a.model.name.endswith(".onnx") else a.model.name
        result = build_portable(
            a.model,
            _calib_options(a),
            fp16=a.fp16,
            int8=a.int8,
            calib_method=a.calib_method,
            synthetic_fraction=a.synthetic_fraction,
            cpu_format=a.cpu_format,
            holdout_dir=a.holdout,
            max_auroc_drop=a.max_auroc_drop,
            max_flip_rate=a.max_flip_rate,
            report_path=a.model.with_name(stem + ".guard.json"),
            log=_log,
        )
        if result.guard is not None:
            print(result.guard.table(), flush=True)
            if not result.guard.passed:
                print(f"pouta-build-engine: accuracy guard failed: {result.guard.reason}", file=sys.stderr)
                return EXIT_GUARD
        version = tensorrt_version()
        if version is None:
            print(
                "TensorRT is not installed: no .plan built; wrote the portable artifacts "
                + ", ".join(p.name for t, p in result.artifacts.items() if t != "fp32")
                + " (ONNX Runtime runs them on CPU)",
                flush=True,
            )
            return 0
        meta = load_for_model(a.model)
        tiles = _tiles_per_frame(meta, a.calib)
        if tiles > a.max_batch:
            # A tiled model runs all tiles of a frame in one call: the profile must hold them.
            print(
                f"pouta-build-engine: tiled model: {tiles} tiles per calibration frame; "
                f"batch profile opt = max = {tiles}",
                flush=True,
            )
            a.opt_batch = a.max_batch = tiles
        for precision in [x for x, on in (("int8", a.int8), ("fp16", a.fp16)) if on]:
            req = BuildRequest(
                precision=precision,
                height=meta.input.height,
                width=meta.input.width,
                onnx_fp32=a.model,
                onnx_fp16=result.artifacts.get("fp16"),
                onnx_int8_qdq=result.artifacts.get("int8-trt"),
                min_batch=a.min_batch,
                opt_batch=a.opt_batch,
                max_batch=a.max_batch,
                workspace_mb=a.workspace_mb,
                timing_cache=a.timing_cache,
                dla_core=a.dla_core,
                version_compatible=a.version_compatible,
            )
            plan = plan_build(version, req)
            out = a.output if (a.output and (precision == "int8" or not a.int8)) else None
            out = out or a.model.with_name(f"{stem}.{precision}.plan")
            _log(f"same plan with trtexec: {trtexec_command(plan, out)}")
            built = build_engine(plan, out, _log)
            _log(f"{out.name}: layer precisions {built.precision_counts}")
            # The plan's thresholds are those of the ONNX it was parsed from, scored by ORT:
            # the plan itself needs a GPU runtime to be scored.
            tag = "int8-trt" if precision == "int8" else ("fp16" if precision == "fp16" else "fp32")
            write_sidecar(
                meta,
                a.model,
                out,
                precision,
                result.thresholds[tag],
                {"from": plan.onnx.name},
                {
                    **plan.describe(),
                    "layer_precisions": built.layer_precisions,
                    "precision_counts": built.precision_counts,
                    "precision_warnings": built.warnings,
                },
            )
            _log(f"wrote {out} (+ {metadata_path(out).name})")
    except PoutaError as exc:
        print(f"pouta-build-engine: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


__all__ = ["CalibrationError", "build_engine_main", "calibrate_main"]


def _tiles_per_frame(meta: ModelMetadata, calib_dir: Path) -> int:
    """Tiles of one frame as large as the first calibration image (1 for whole-image models)."""
    if not meta.input.tile_scale:
        return 1
    first = list_images(calib_dir, "calibration")[0]
    return preprocessor_for(meta).geometry(read_image(first).shape).n_tiles
