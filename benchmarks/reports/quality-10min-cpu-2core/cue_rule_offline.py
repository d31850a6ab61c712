"""Compare cue fusion rules offline on maps cached by ``cue_map_cache.py``.

Every rule fuses the discriminator's map a and the SSIM error r pixel by pixel into a map
in [0, 1] (the model contract), from statistics of the 64 normal training inputs only
(image scores = the contract's pooled max): k = mean, s = standard deviation, q = maximum.

- ``disc`` / ``rec``: a alone / r alone
- ``mean_sat``: 0.5 (a / (a + k_a) + r / (r + k_r)), the model's rule until ccdfdae
- ``mean_sat_p2``: the same with each ratio squared first ((a/k)^2 / (1 + (a/k)^2))
- ``mean_sat_qmax``: the same with the largest good score instead of the mean
- ``noisy_or``: 1 - (1 - a / (a + k_a)) (1 - r / (r + k_r))
- ``w_inv_spread``: each saturated cue weighted by 1 / the spread of its saturated good scores
- ``w_inv_cv``: each saturated cue weighted by k / s (the inverse coefficient of variation)
- ``model_weights``: ``w_inv_cv`` with each share kept within [0.1, 0.9], the model's rule
- ``sigmoid_z``: 0.5 (sigmoid((a - k_a) / s_a) + sigmoid((r - k_r) / s_r))
- ``z_sum``: (a - k_a) / s_a + (r - k_r) / s_r (unbounded; image AUROC only)
- ``sat_z``: each cue's excess over k in units of s, saturated, averaged

    python cue_rule_offline.py CACHE_DIR OUT.json        (repository root)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pouta.trainer.metrics import roc_auc
from pouta.trainer.models.layers import cue_weights

sys.path.insert(0, str(Path(__file__).parent))
from cue_fusion_probe import pooled_max

Stats = dict[str, float]
Rule = Callable[[np.ndarray, np.ndarray, Stats], np.ndarray]


def sat(x: np.ndarray, k: float, p: float = 1.0) -> np.ndarray:
    y = (x / k) ** p
    return y / (1.0 + y)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def inv_spread_weights(st: Stats) -> tuple[float, float]:
    wa, wr = 1.0 / st["s_sat_a"], 1.0 / st["s_sat_r"]
    return wa / (wa + wr), wr / (wa + wr)


RULES: dict[str, Rule] = {
    "disc": lambda a, r, st: a,
    "rec": lambda a, r, st: r,
    "mean_sat": lambda a, r, st: 0.5 * (sat(a, st["k_a"]) + sat(r, st["k_r"])),
    "mean_sat_p2": lambda a, r, st: 0.5 * (sat(a, st["k_a"], 2) + sat(r, st["k_r"], 2)),
    "mean_sat_qmax": lambda a, r, st: 0.5 * (sat(a, st["q_a"]) + sat(r, st["q_r"])),
    "noisy_or": lambda a, r, st: 1 - (1 - sat(a, st["k_a"])) * (1 - sat(r, st["k_r"])),
    "w_inv_spread": lambda a, r, st: (lambda w: w[0] * sat(a, st["k_a"]) + w[1] * sat(r, st["k_r"]))(
        inv_spread_weights(st)
    ),
    "w_inv_cv": lambda a, r, st: (
        lambda wa, wr: (wa * sat(a, st["k_a"]) + wr * sat(r, st["k_r"])) / (wa + wr)
    )(st["k_a"] / st["s_a"], st["k_r"] / st["s_r"]),
    # the rule ``pouta-train`` fits since ccdfdae (``layers.cue_weights``: w_inv_cv, shares within [0.1, 0.9])
    "model_weights": lambda a, r, st: (lambda w: w[0] * sat(a, st["k_a"]) + w[1] * sat(r, st["k_r"]))(
        cue_weights((st["k_a"], st["k_r"]), (st["s_a"], st["s_r"]))
    ),
    "sigmoid_z": lambda a, r, st: (
        0.5 * (sigmoid((a - st["k_a"]) / st["s_a"]) + sigmoid((r - st["k_r"]) / st["s_r"]))
    ),
    "z_sum": lambda a, r, st: (a - st["k_a"]) / st["s_a"] + (r - st["k_r"]) / st["s_r"],
    "sat_z": lambda a, r, st: (
        0.5
        * (
            sat(np.maximum(a - st["k_a"], 0) + st["s_a"], st["s_a"])
            + sat(np.maximum(r - st["k_r"], 0) + st["s_r"], st["s_r"])
        )
    ),
}


def stats(normal: np.ndarray) -> Stats:
    a, r = normal[:, 0].astype(np.float32), normal[:, 1].astype(np.float32)
    sa, sr = pooled_max(a), pooled_max(r)
    st = {"k_a": float(sa.mean()), "k_r": float(sr.mean()), "s_a": float(sa.std()), "s_r": float(sr.std())}
    st |= {"q_a": float(sa.max()), "q_r": float(sr.max())}
    st["s_sat_a"] = float(pooled_max(sat(a, st["k_a"])).std())
    st["s_sat_r"] = float(pooled_max(sat(r, st["k_r"])).std())
    return st


def main(argv: list[str]) -> int:
    cache, out = Path(argv[0]), argv[1]
    rows = []
    for f in sorted(cache.glob("*.npz")):
        d = np.load(f)
        st = stats(d["normal"])
        s = d["scored"].astype(np.float32)
        y = d["labels"]
        row: dict[str, object] = {"model": f.stem, "stats": st, "image": {}, "pixel": {}}
        for name, rule in RULES.items():
            row["image"][name] = round(roc_auc(y, pooled_max(rule(s[:, 0], s[:, 1], st))), 4)  # type: ignore[index]
            if "shown" in d and name not in ("z_sum",):
                sh = d["shown"].astype(np.float32)
                row["pixel"][name] = round(
                    roc_auc(d["masks"].ravel(), rule(sh[:, 0], sh[:, 1], st).ravel()), 4
                )  # type: ignore[index]
        rows.append(row)
        print(f.stem, json.dumps(row["image"]), flush=True)
    Path(out).write_text(json.dumps(rows, indent=1))
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        cat = str(row["model"]).split("_", 1)[1]
        group = "vanilla" if str(row["model"]).split("_")[0].endswith("v") else "pouta"
        for name, v in row["image"].items():  # type: ignore[union-attr]
            table[f"{group}:{cat}"][name].append(v)
    names = list(RULES)
    print("group:category".ljust(28) + "".join(n[:11].rjust(12) for n in names))
    for key, per in sorted(table.items()):
        print(key.ljust(28) + "".join(f"{np.mean(per[n]):12.3f}" for n in names))
    for group in ("pouta", "vanilla"):
        keys = [k for k in table if k.startswith(group)]
        if keys:
            print(
                f"{group} mean".ljust(28)
                + "".join(f"{np.mean([np.mean(table[k][n]) for k in keys]):12.3f}" for n in names)
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
