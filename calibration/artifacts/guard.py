"""Accuracy guard: does a reduced-precision artifact still separate good from bad parts?

On a held-out labelled split, each artifact (FP16, INT8 CPU, INT8 TensorRT, plan) is
compared with the FP32 model: image AUROC of both, the AUROC drop, max/mean absolute
score difference, and the share of images whose verdict differs, each artifact judged
at its own calibrated threshold (which is how each runs on the line).

Two tolerances can fail the guard, both opt-in because what a line can afford differs:
``max_auroc_drop`` (ranking) and ``max_flip_rate`` (verdicts). AUROC alone can stay put
while a reduced file shifts every score across the threshold, so without a flip tolerance
an artifact that changes more than ``WARN_FLIP_RATE`` of the held-out verdicts still gets a
warning line naming it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import CalibrationError

WARN_FLIP_RATE = 0.10  # share of held-out verdicts changed that earns a warning


def _roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    try:
        from pouta.trainer.metrics import roc_auc
    except ImportError:
        raise CalibrationError(
            "AUROC needs pouta.trainer.metrics (numpy-only), which is not installed with this package"
        ) from None
    return float(roc_auc(labels, scores))


@dataclass
class ArtifactAgreement:
    name: str
    precision: str
    threshold: float
    auroc: float | None
    auroc_drop: float | None  # FP32 AUROC - this AUROC (positive = worse)
    max_abs_diff: float
    mean_abs_diff: float
    verdict_flip_rate: float
    n_flipped: int


@dataclass
class GuardReport:
    n_normal: int
    n_defect: int
    split: str  # where the held-out images came from
    reference: ArtifactAgreement
    artifacts: list[ArtifactAgreement] = field(default_factory=list)
    max_auroc_drop: float | None = None
    max_flip_rate: float | None = None
    passed: bool = True
    reason: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        head = (
            f"{'artifact':<28} {'prec':<5} {'AUROC':>7} {'drop':>7} {'max|d|':>8} {'mean|d|':>8} {'flips':>7}"
        )
        rows = [head, "-" * len(head)]
        for a in [self.reference, *self.artifacts]:
            auroc = "n/a" if a.auroc is None else f"{a.auroc:.4f}"
            drop = "n/a" if a.auroc_drop is None else f"{a.auroc_drop:+.4f}"
            rows.append(
                f"{a.name[:28]:<28} {a.precision:<5} {auroc:>7} {drop:>7} {a.max_abs_diff:>8.4f} "
                f"{a.mean_abs_diff:>8.4f} {a.verdict_flip_rate:>7.2%}"
            )
        verdict = "PASS" if self.passed else f"FAIL: {self.reason}"
        rows.append(f"held-out: {self.n_normal} normal, {self.n_defect} defect ({self.split}); {verdict}")
        rows += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(rows)


def _flip_text(a: ArtifactAgreement, n: int) -> str:
    return f"{a.name} changes {a.n_flipped} of {n} held-out verdicts vs FP32 ({a.verdict_flip_rate:.1%})"


def check_share(value: float | None, option: str) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise CalibrationError(f"{option}: expected a share between 0 and 1, got {value}")


def compare(
    labels: np.ndarray,
    reference_scores: np.ndarray,
    reference_threshold: float,
    candidates: list[tuple[str, str, np.ndarray, float]],
    max_auroc_drop: float | None = None,
    split: str = "",
    max_flip_rate: float | None = None,
) -> GuardReport:
    """``candidates``: (artifact name, precision, scores, calibrated threshold) each."""
    check_share(max_flip_rate, "--max-flip-rate")
    labels = np.asarray(labels, dtype=bool)
    ref = np.asarray(reference_scores, dtype=np.float64)
    has_both = bool(labels.any() and (~labels).any())
    if max_auroc_drop is not None and not has_both:
        raise CalibrationError(
            "--max-auroc-drop needs held-out normal AND defect images (--defects DIR or --holdout DIR)"
        )
    ref_auc = _roc_auc(labels, ref) if has_both else None
    ref_verdict = ref > reference_threshold
    reference = ArtifactAgreement(
        "fp32 (reference)", "fp32", reference_threshold, ref_auc, 0.0 if has_both else None, 0.0, 0.0, 0.0, 0
    )
    report = GuardReport(
        n_normal=int((~labels).sum()),
        n_defect=int(labels.sum()),
        split=split,
        reference=reference,
        max_auroc_drop=max_auroc_drop,
        max_flip_rate=max_flip_rate,
    )
    for name, precision, scores, thr in candidates:
        s = np.asarray(scores, dtype=np.float64)
        diff = np.abs(s - ref)
        auc = _roc_auc(labels, s) if has_both else None
        drop = (ref_auc - auc) if (auc is not None and ref_auc is not None) else None
        flips = int(np.sum((s > thr) != ref_verdict))
        report.artifacts.append(
            ArtifactAgreement(
                name=name,
                precision=precision,
                threshold=float(thr),
                auroc=auc,
                auroc_drop=drop,
                max_abs_diff=float(diff.max()) if diff.size else 0.0,
                mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
                verdict_flip_rate=flips / max(1, s.size),
                n_flipped=flips,
            )
        )
    reasons: list[str] = []
    if max_auroc_drop is not None:
        worst = max(report.artifacts, key=lambda a: a.auroc_drop or 0.0, default=None)
        if worst is not None and worst.auroc_drop is not None and worst.auroc_drop > max_auroc_drop:
            reasons.append(
                f"{worst.name} loses {worst.auroc_drop:.4f} image AUROC vs FP32 "
                f"({worst.auroc:.4f} vs {ref_auc:.4f}), more than --max-auroc-drop {max_auroc_drop}"
            )
    n = int(labels.size)
    most = max(report.artifacts, key=lambda a: a.verdict_flip_rate, default=None)
    if max_flip_rate is not None and most is not None and most.verdict_flip_rate > max_flip_rate:
        reasons.append(f"{_flip_text(most, n)}, more than --max-flip-rate {max_flip_rate}")
    elif max_flip_rate is None:
        report.warnings = [
            f"{_flip_text(a, n)}, over {WARN_FLIP_RATE:.0%}; --max-flip-rate makes such a file fail the build"
            for a in report.artifacts
            if a.verdict_flip_rate > WARN_FLIP_RATE
        ]
    if reasons:
        report.passed = False
        report.reason = "; ".join(reasons)
    return report
