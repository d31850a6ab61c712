"""How image-threshold rules trade false rejects for escapes on the quality passes' test sets.

For every ``RUN/quality/CATEGORY/KIND/eval/report.json`` whose test split has at least
``2 * N_CAL`` good parts: ``SPLITS`` random splits of the good test parts into N_CAL that
calibrate the threshold (what ``pouta-build-engine --calib`` sees: good parts the model did
not train on) and the rest, which measure the false-reject rate; every defective test part
measures the escape rate. Scores are ``pouta-eval``'s, as the runtime computes them, so no
model is run here. The rules are those of ``calibration.thresholds`` plus candidates.

    python threshold_rule_probe.py RUN [RUN...]        (repository root)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pouta.calibration.thresholds import image_threshold

N_CAL = (40, 64)
SPLITS = 200


def _odds_margin(margin: float) -> Callable[[np.ndarray], float]:
    def rule(n: np.ndarray) -> float:
        top = min(float(n.max()), 1.0 - 1e-9)
        odds = margin * top / (1.0 - top)
        return odds / (1.0 + odds)

    return rule


RULES: dict[str, Callable[[np.ndarray], float]] = {
    "max x1.1 (default)": lambda n: image_threshold("normal-max-margin", n, margin=1.1)[0],
    "max (no margin)": lambda n: float(n.max()),
    "odds(max) x1.1": _odds_margin(1.1),
    "odds(max) x1.25": _odds_margin(1.25),
    "max + 1 std": lambda n: float(n.max() + n.std()),
    "p75 + 3 IQR": lambda n: image_threshold("normal-quantile", n, quantile=0.75, iqr_k=3.0)[0],
}


def reports(runs: list[Path]) -> list[tuple[str, dict]]:
    found = []
    for run in runs:
        for f in sorted(run.glob("quality/*/*/eval/report.json")):
            found.append((f"{run.name}/{f.parts[-4]}/{f.parts[-3]}", json.loads(f.read_text())))
    return found


def main(argv: list[str]) -> int:
    rng = np.random.default_rng(0)
    rows = reports([Path(a) for a in argv])
    for n_cal in N_CAL:
        totals = {r: [[], []] for r in RULES}
        print(f"\n## {n_cal} good parts calibrate; false rejects / escapes in %, mean over {SPLITS} splits")
        print("| model | good, defective | " + " | ".join(RULES) + " |")
        print("|---|---|" + "---|" * len(RULES))
        for name, rep in rows:
            s = np.array([x["score"] for x in rep["scores"]])
            y = np.array([x["label"] for x in rep["scores"]])
            good, bad = s[y == 0], s[y == 1]
            if good.size < 2 * n_cal:
                continue
            cells = []
            for rule, fn in RULES.items():
                frr, esc = [], []
                for _ in range(SPLITS):
                    perm = rng.permutation(good.size)
                    thr = fn(good[perm[:n_cal]])
                    frr.append(float(np.mean(good[perm[n_cal:]] > thr)))
                    esc.append(float(np.mean(bad <= thr)))
                totals[rule][0].append(np.mean(frr))
                totals[rule][1].append(np.mean(esc))
                cells.append(f"{100 * np.mean(frr):.1f} / {100 * np.mean(esc):.1f}")
            print(f"| {name} | {good.size}, {bad.size} | " + " | ".join(cells) + " |")
        mean_cells = [f"**{100 * np.mean(f):.1f} / {100 * np.mean(e):.1f}**" for f, e in totals.values()]
        print(
            f"| **mean of {len(totals[next(iter(RULES))][0])} models** | | " + " | ".join(mean_cells) + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
