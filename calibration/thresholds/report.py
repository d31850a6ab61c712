"""The operating-point report: one PNG and one self-contained HTML page next to an artifact.

What a quality engineer signs before a threshold goes to the line: the objective and its
stated-confidence bound, the false-reject and escape rates measured on held-out parts (per
defect type, with intervals), the trade-off they buy, and the parts nearest the wrong side.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pouta.edge.contract.errors import ImageReadError
from pouta.edge.contract.fsutil import atomic_write_bytes, atomic_write_text
from pouta.edge.contract.metadata import Thresholds
from pouta.edge.contract.preprocess import read_image

from .operating_point import HeldOut, nearest_misses
from .plots import figure_png, operating_point_figure

N_MISSES = 6  # nearest misses shown on each side
THUMB_PX = 96


def report_paths(artifact: str | os.PathLike[str]) -> tuple[Path, Path]:
    a = Path(artifact)
    return a.with_name(a.name + ".oppoint.png"), a.with_name(a.name + ".oppoint.html")


def _thumb(path: Path) -> np.ndarray:
    """RGB uint8 thumbnail of a part as stored (gray and 16-bit images stretched to 8 bits)."""
    try:
        img = read_image(path)
    except ImageReadError:
        return np.full((THUMB_PX, THUMB_PX, 3), 128, np.uint8)  # unreadable now: a grey tile
    if img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    else:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    s = THUMB_PX / max(h, w)
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def misses(threshold: float, held: HeldOut) -> dict[str, list[dict[str, Any]]]:
    """The parts nearest the wrong side, worst first: goods by highest score, defects by lowest."""
    out: dict[str, list[dict[str, Any]]] = {"good": [], "defect": []}
    for side, scores, files, types in (
        ("good", held.good, held.good_files, ["good"] * held.good.size),
        ("defect", held.defect, held.defect_files, held.defect_types),
    ):
        if not files:
            continue
        for i in nearest_misses(scores, N_MISSES, good=side == "good"):
            s = float(scores[i])
            out[side].append(
                {
                    "file": files[i],
                    "type": types[i],
                    "score": s,
                    "ratio": s / threshold if threshold > 0 else float("inf"),
                    "verdict": "NG" if s > threshold else "OK",
                }
            )
    return out


def _caption(m: dict[str, Any]) -> str:
    name = f"{m['type']}/{m['file'].name}"
    name = name if len(name) <= 22 else name[:19] + "..."
    return f"{name}\n{m['score']:.4g} ({m['ratio']:.2f}x thr) {m['verdict']}"


def _pct(r: dict[str, Any]) -> str:
    lo, hi = r["ci"]
    return f"{100 * r['rate']:.3g}%", f"{100 * lo:.3g}% - {100 * hi:.3g}%"


def render_html(
    artifact: str, t: Thresholds, held: HeldOut, near: dict[str, list[dict[str, Any]]], png: bytes
) -> str:
    op = t.operating_point
    m = op.get("measured", {})
    conf = m.get("confidence", op.get("confidence", 0.95))
    e = html.escape
    if op.get("objective") in ("false_reject", "escape"):
        what = "false rejects" if op["objective"] == "false_reject" else "escapes"
        parts = "good" if op["objective"] == "false_reject" else "defective"
        objective = (
            f"{what} &le; {100 * op['target']:.3g}% with {100 * op['confidence']:.3g}% confidence "
            f"(order statistic {op['rank']} of {op['n']} {parts} calibration parts; "
            f"at most {op['allowed']} on the wrong side; guaranteed bound {100 * op['bound']:.3g}%)"
        )
    else:
        objective = f"rule {e(t.rule)} {e(str(t.params))} (no stated-confidence bound)"
    rows = []
    for label, key in (
        ("good parts rejected (false rejects)", "false_reject"),
        ("defects passed (escapes)", "escape"),
    ):
        if key in m:
            r = m[key]
            rate, ci = _pct(r)
            note = " (in-sample: these parts chose the threshold)" if r.get("in_sample") else ""
            rows.append(
                f"<tr><td>{label}{note}</td><td>{r['count']} / {r['n']}</td><td>{rate}</td><td>{ci}</td></tr>"
            )
    for typ, r in m.get("escape_by_type", {}).items():
        rate, ci = _pct(r)
        rows.append(
            f"<tr><td>&nbsp;&nbsp;escapes: {e(typ)}</td><td>{r['count']} / {r['n']}</td><td>{rate}</td><td>{ci}</td></tr>"
        )
    miss_rows = []
    for side, items in near.items():
        for x in items:
            miss_rows.append(
                f"<tr><td>{side}</td><td>{e(x['type'])}</td><td>{e(x['file'].name)}</td>"
                f"<td>{x['score']:.6g}</td><td>{x['ratio']:.3f}</td><td>{x['verdict']}</td></tr>"
            )
    img = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Operating point: {e(artifact)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1300px}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #bbb;padding:2px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>Operating point: {e(artifact)}</h1>
<table>
<tr><th>image threshold</th><td>{t.image:.6g} (NG when the score is above it)</td></tr>
<tr><th>objective</th><td>{objective}</td></tr>
<tr><th>calibration</th><td>{t.n_normal} good parts scored with {e(t.scored_with)}</td></tr>
<tr><th>held out</th><td>{e(held.split)}</td></tr>
</table>
<h2>Measured on held-out parts ({100 * conf:.3g}% Clopper-Pearson intervals)</h2>
<table><tr><th></th><th>parts</th><th>rate</th><th>interval</th></tr>
{"".join(rows)}</table>
<img src="data:image/png;base64,{img}" alt="score distributions, ROC with the chosen point, rates against the threshold, nearest misses">
<h2>Nearest misses</h2>
<table><tr><th>side</th><th>type</th><th>file</th><th>score</th><th>score / threshold</th><th>verdict</th></tr>
{"".join(miss_rows)}</table>
<p>Approved for the line by ____________________ date __________</p>
</body></html>
"""


def write_report(
    artifact: str | os.PathLike[str], t: Thresholds, calib_good: np.ndarray, held: HeldOut
) -> tuple[Path, Path]:
    """Write ``<artifact>.oppoint.png`` and ``<artifact>.oppoint.html``."""
    name = Path(artifact).name
    op = t.operating_point
    confidence = float(op.get("measured", {}).get("confidence", op.get("confidence", 0.95)))
    target = (op["objective"], float(op["target"])) if "target" in op else None
    near = misses(t.image, held)
    thumbs = tuple([(_thumb(x["file"]), _caption(x)) for x in near[side]] for side in ("good", "defect"))
    fig = operating_point_figure(
        t.image,
        np.asarray(calib_good, np.float64),
        held,
        confidence,
        target,
        title=f"{name}: threshold {t.image:.4g}",
        thumbs=thumbs,  # type: ignore[arg-type]
    )
    png = figure_png(fig)
    png_path, html_path = report_paths(artifact)
    atomic_write_bytes(png_path, png, fsync=False)
    atomic_write_text(html_path, render_html(name, t, held, near, png), fsync=False)
    return png_path, html_path
