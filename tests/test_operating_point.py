"""Thresholds in the line's currency: the order-statistic bound's coverage by simulation,
the binomial arithmetic against SciPy, too-few-parts errors, the measured operating point
per defect type in the sidecar, and the line ``pouta-edge run`` prints at start."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from contract_models import dark_part, make_brightness_model
from pouta.calibration import cli
from pouta.calibration.errors import CalibrationError
from pouta.calibration.thresholds.binomial import (
    allowed_exceedances,
    binom_cdf,
    clopper_pearson,
    min_parts,
    upper_bound,
)
from pouta.calibration.thresholds.rules import escape_threshold, false_reject_threshold
from pouta.edge.contract.metadata import Thresholds, load_for_model, operating_point_line

stats = pytest.importorskip("scipy.stats")

H = W = 64


@pytest.mark.parametrize(("k", "n", "p"), [(0, 598, 0.005), (3, 100, 0.05), (50, 1000, 0.04), (7, 9, 0.6)])
def test_binom_cdf_matches_scipy(k: int, n: int, p: float) -> None:
    assert binom_cdf(k, n, p) == pytest.approx(float(stats.binom.cdf(k, n, p)), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("x", "n"), [(0, 10), (3, 10), (10, 10), (5, 200), (1, 129)])
def test_clopper_pearson_matches_beta_quantiles(x: int, n: int) -> None:
    lo, hi = clopper_pearson(x, n, 0.95)
    want_lo = float(stats.beta.ppf(0.025, x, n - x + 1)) if x > 0 else 0.0
    want_hi = float(stats.beta.ppf(0.975, x + 1, n - x)) if x < n else 1.0
    assert lo == pytest.approx(want_lo, abs=1e-9) and hi == pytest.approx(want_hi, abs=1e-9)


def test_parts_needed_and_rank() -> None:
    # (1 - 0.005)^n <= 0.05 first holds at n = 598: the textbook "about 600 parts for 0.5%".
    assert min_parts(0.005, 0.95) == 598 == math.ceil(math.log(0.05) / math.log(0.995))
    assert allowed_exceedances(597, 0.005, 0.95) is None and allowed_exceedances(598, 0.005, 0.95) == 0
    j = allowed_exceedances(2000, 0.005, 0.95)
    assert j is not None and binom_cdf(j, 2000, 0.005) <= 0.05 < binom_cdf(j + 1, 2000, 0.005)
    assert upper_bound(j, 2000, 0.95) <= 0.005


# Score distributions of good parts: light and heavy upper tails, a probability-like score
# squeezed below 1, and a coarse one with many ties (quantised scores).
DISTRIBUTIONS = {
    "normal": stats.norm(0.3, 0.05),
    "lognormal": stats.lognorm(0.6, scale=0.05),
    "beta": stats.beta(8, 2),
    "pareto": stats.pareto(3.0, scale=0.01),
}
REPS = 4000
ALPHA = 0.05
# Three standard errors of a Monte-Carlo frequency near ALPHA over REPS repetitions.
MC_TOL = 3 * math.sqrt(ALPHA * (1 - ALPHA) / REPS)


def _sample(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    return DISTRIBUTIONS[name].rvs(size=(REPS, n), random_state=rng)


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize(("n", "target"), [(600, 0.005), (1500, 0.005), (120, 0.05)])
def test_false_reject_coverage_by_simulation(name: str, n: int, target: float) -> None:
    rng = np.random.default_rng([n, *name.encode()])  # str hash() varies per process
    dist = DISTRIBUTIONS[name]
    goods = _sample(name, n, rng)
    thr = np.array([false_reject_threshold(g, target, 1 - ALPHA)[0] for g in goods[:50]])
    # The rule is an order statistic fixed by (n, target, confidence): the rest vectorised.
    j = allowed_exceedances(n, target, 1 - ALPHA)
    assert j is not None
    ordered = np.sort(goods, axis=1)
    assert np.array_equal(thr, ordered[:50, n - 1 - j])
    realised = dist.sf(ordered[:, n - 1 - j])  # true false-reject rate of each calibration
    miss = float(np.mean(realised > target))
    assert miss <= ALPHA + MC_TOL
    # Not merely conservative: the miss rate is the binomial tail the rank was chosen by.
    assert abs(miss - binom_cdf(j, n, target)) <= MC_TOL
    # The empirical (1 - target) quantile, the naive reading of "0.5% false rejects", fails.
    naive = dist.sf(np.quantile(goods, 1 - target, axis=1))
    assert float(np.mean(naive > target)) > ALPHA + MC_TOL


def test_false_reject_coverage_with_tied_scores() -> None:
    # Scores quantised to 1/64: many ties at the top. Ties make the rule more conservative.
    rng = np.random.default_rng(7)
    n, target = 600, 0.005
    levels = np.arange(64) / 64.0
    probs = stats.norm(0.5, 0.08).pdf(levels)
    probs /= probs.sum()
    sf = 1.0 - np.cumsum(probs)  # P(score > level)
    draws = rng.choice(64, size=(REPS, n), p=probs)
    thr_idx = np.array([round(false_reject_threshold(levels[d], target)[0] * 64) for d in draws])
    miss = float(np.mean(sf[thr_idx] > target))
    assert miss <= ALPHA + MC_TOL


@pytest.mark.parametrize(("m", "target"), [(60, 0.05), (300, 0.02)])
def test_escape_coverage_by_simulation(m: int, target: float) -> None:
    rng = np.random.default_rng(m)
    dist = stats.beta(5, 2)
    reps = 1500
    defects = dist.rvs(size=(reps, m), random_state=rng)
    thr = np.array([escape_threshold(d, target)[0] for d in defects])
    realised = dist.cdf(thr)  # true escape rate: defective parts at or below the threshold
    tol = 3 * math.sqrt(ALPHA * (1 - ALPHA) / reps)
    assert float(np.mean(realised > target)) <= ALPHA + tol
    # At most j known defects pass, and the next one is rejected.
    j = allowed_exceedances(m, target, 0.95)
    assert j is not None
    for d, t in zip(defects[:20], thr[:20], strict=True):
        assert int(np.sum(d <= t)) <= j and np.sort(d)[j] > t


@pytest.mark.parametrize(
    ("fn", "n", "match"),
    [
        (
            false_reject_threshold,
            100,
            "--target-false-reject 0.005 at 0.95 confidence needs at least 598 good",
        ),
        (
            escape_threshold,
            10,
            "--target-escape 0.005 at 0.95 confidence needs at least 598 labelled defective",
        ),
    ],
)
def test_too_few_parts_names_how_many(fn: object, n: int, match: str) -> None:
    with pytest.raises(CalibrationError, match=match) as exc:
        fn(np.linspace(0.1, 0.2, n), 0.005)  # type: ignore[operator]
    assert "\n" not in str(exc.value) and f"got {n}" in str(exc.value)


def test_saturated_good_scores_are_refused() -> None:
    with pytest.raises(CalibrationError, match="score ceiling"):
        false_reject_threshold(np.ones(100), 0.05)


def _parts(folder: Path, n: int, seed: int, defect: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"p{i:03d}.png"), dark_part(H, W, rng, defect))
    return folder


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("oppoint")
    test = d / "test"
    _parts(test / "good", 24, seed=11)
    _parts(test / "spot", 6, seed=12, defect=True)
    # Defects the brightness detector cannot see: they look like good parts, so they escape.
    _parts(test / "faint", 5, seed=13)
    return {"dir": d, "calib": _parts(d / "calib", 30, seed=10), "test": test}


def _held_scores(model: Path, folder: Path) -> np.ndarray:
    from pouta.calibration.calibset import load_image_set
    from pouta.calibration.scoring import score_set
    from pouta.edge.backends.onnx_runtime import OnnxRuntimeBackend
    from pouta.edge.contract.preprocess import preprocessor_for

    meta = load_for_model(model)
    images = load_image_set(folder, preprocessor_for(meta), n=None, min_images=1)
    return score_set(OnnxRuntimeBackend(model, metadata=meta), images).scores


def test_calibrate_to_a_false_reject_target_measures_the_holdout(
    line: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_brightness_model(tmp_path / "model.onnx", H, W)
    args = [str(model), "--calib", str(line["calib"]), "--min-calib", "8", "--holdout", str(line["test"])]
    rc = cli.calibrate_main([*args, "--target-false-reject", "0.1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    t = load_for_model(model).thresholds
    assert t is not None and t.rule == "target-false-reject"
    assert t.params["target"] == 0.1 and t.params["confidence"] == 0.95
    op = t.operating_point
    # 30 good parts, 10% at 95%: 0.9^30 <= 0.05 < P(Bin(30, 0.1) <= 1), so the maximum, j = 0.
    assert (op["objective"], op["n"], op["rank"], op["allowed"]) == ("false_reject", 30, 30, 0)
    assert op["bound"] == pytest.approx(1 - 0.05 ** (1 / 30), abs=1e-9)
    assert t.image == t.normal_score_stats["max"]
    m = op["measured"]
    good = _held_scores(model, line["test"] / "good")
    faint = _held_scores(model, line["test"] / "faint")
    assert m["false_reject"]["count"] == int(np.sum(good > t.image)) and m["false_reject"]["n"] == 24
    assert not m["false_reject"]["in_sample"] and not m["escape"]["in_sample"]
    assert m["escape_by_type"]["spot"]["count"] == 0 and m["escape_by_type"]["spot"]["n"] == 6
    faint_escaped = int(np.sum(faint <= t.image))
    assert faint_escaped >= 1 and m["escape_by_type"]["faint"] == {
        "count": faint_escaped,
        "n": 5,
        "rate": faint_escaped / 5,
        "ci": list(clopper_pearson(faint_escaped, 5, 0.95)),
    }
    assert m["escape"]["count"] == faint_escaped and m["escape"]["n"] == 11
    lo, hi = m["escape"]["ci"]
    assert lo <= m["escape"]["rate"] <= hi
    assert "false rejects <= 10% at 95% confidence (score 30 of 30 good" in out
    # The page to sign sits next to the model and says the same numbers.
    assert op["report"] == "model.onnx.oppoint.html"
    page = (tmp_path / op["report"]).read_text()
    assert f"image threshold</th><td>{t.image:.6g} " in page
    assert (
        f"escapes: faint</td><td>{faint_escaped} / 5</td>" in page
        and "escapes: spot</td><td>0 / 6</td>" in page
    )

    # pouta-edge run says what was signed, on one line, before the first part.
    from pouta.edge import cli as edge_cli

    rc = edge_cli.main(
        ["run", "--model", str(model), "--images", str(line["test"]), "--out", str(tmp_path / "r"), "--quiet"]
    )
    first = capsys.readouterr().out.splitlines()[0]
    assert rc == edge_cli.EXIT_OK
    assert first.startswith(f"operating point: threshold {t.image:.6g}, false rejects <= 10% at 95%")
    assert f"escapes {100 * faint_escaped / 11:.1f}%" in first and f"faint {faint_escaped}/5" in first


def test_escape_target_chooses_on_the_labelled_holdout(
    line: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 11 defects cannot support 5% escapes at 95% (59 needed): refused before any work.
    model = make_brightness_model(tmp_path / "model.onnx", H, W)
    base = [str(model), "--calib", str(line["calib"]), "--min-calib", "8", "--holdout", str(line["test"])]
    assert cli.calibrate_main([*base, "--target-escape", "0.05"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == (
        "pouta-calibrate: --target-escape 0.05 at 0.95 confidence needs at least 59 labelled defective "
        "parts, got 11 (add parts, or relax the target or --confidence)"
    )
    # At 0.3 and 90%: 0.7^11 <= 0.1, j = 0: the threshold sits just below the lowest defect.
    assert cli.calibrate_main([*base, "--target-escape", "0.3", "--confidence", "0.9"]) == 0
    t = load_for_model(model).thresholds
    assert t is not None and t.operating_point["objective"] == "escape" and t.operating_point["allowed"] == 0
    defects = np.concatenate([_held_scores(model, line["test"] / k) for k in ("spot", "faint")])
    assert t.image < defects.min() and np.float32(defects.min()) > np.float32(t.image)
    m = t.operating_point["measured"]
    assert m["escape"]["count"] == 0 and m["escape"]["in_sample"] and not m["false_reject"]["in_sample"]


def test_both_objectives_and_bad_rates_are_one_line_errors(
    line: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_brightness_model(tmp_path / "model.onnx", H, W)
    base = [str(model), "--calib", str(line["calib"]), "--min-calib", "8"]
    cases = [
        (["--target-false-reject", "0.1", "--target-escape", "0.1"], "give one objective, not both"),
        (["--target-false-reject", "5"], "--target-false-reject: expected a rate between 0 and 1"),
        (["--target-false-reject", "0.1", "--confidence", "95"], "--confidence: expected a value between"),
        (["--target-false-reject", "0.05"], "needs at least 59 good calibration parts, got 30"),
        (["--target-escape", "0.1"], "--target-escape needs labelled defect images"),
    ]
    for extra, match in cases:
        assert cli.build_engine_main([*base, *extra]) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert err.startswith("pouta-build-engine: ") and "\n" not in err and match in err, err
    # Refused before any artifact was converted.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.json"]


def test_start_line_for_old_sidecars_and_overridden_thresholds() -> None:
    old = Thresholds(image=0.42, pixel=0.5, rule="normal-max-margin")
    assert operating_point_line(old) == (
        "operating point: threshold 0.42, rule normal-max-margin (no stated-confidence bound); "
        "no held-out rates (calibrate with --holdout)"
    )
    assert operating_point_line(old, 0.42) == operating_point_line(old)
    assert operating_point_line(old, 0.6).endswith(
        "the config overrides the threshold 0.42 with 0.6: these rates do not apply"
    )
    assert operating_point_line(None) == ""


def _report_case(tmp_path: Path) -> tuple[Thresholds, np.ndarray, object]:
    from pouta.calibration.thresholds.operating_point import HeldOut, measure
    from pouta.calibration.thresholds.rules import calibrate_thresholds

    rng = np.random.default_rng(3)
    calib = rng.beta(20, 30, 120)
    t = calibrate_thresholds(calib, rule="target-false-reject", target=0.05, scored_with="m.int8.onnx")
    good_files = [_parts(tmp_path / "test" / "good", 10, seed=1) / f"p{i:03d}.png" for i in range(10)]
    crack = _parts(tmp_path / "test" / "crack", 4, seed=2, defect=True)
    spot = _parts(tmp_path / "test" / "spot", 5, seed=3, defect=True)
    defect_files = [crack / f"p{i:03d}.png" for i in range(4)] + [spot / f"p{i:03d}.png" for i in range(5)]
    good = np.array([0.30, 0.35, 0.52, 0.41, 0.62, 0.38, 0.44, 0.33, 0.47, 0.36])
    defect = np.array([0.58, 0.71, 0.49, 0.80, 0.66, 0.61, 0.93, 0.55, 0.75])
    held = HeldOut(
        good=good,
        defect=defect,
        defect_types=["crack"] * 4 + ["spot"] * 5,
        split="test (labelled split)",
        good_files=good_files,
        defect_files=defect_files,
    )
    t.image = 0.56  # a round threshold inside both sets, so both sides have a miss
    t.operating_point["measured"] = measure(t.image, held, 0.95)
    return t, calib, held


def test_report_figure_puts_the_chosen_point_on_the_roc(tmp_path: Path) -> None:
    from pouta.calibration.thresholds.plots import operating_point_figure

    t, calib, held = _report_case(tmp_path)
    fig = operating_point_figure(t.image, calib, held, 0.95, ("false_reject", 0.05))  # type: ignore[arg-type]
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}
    chosen = lines["chosen"].get_xydata()[0]
    # 1 of 10 goods above 0.56 (0.62); 2 of 9 defects at or below it (0.49, 0.55).
    assert tuple(chosen) == pytest.approx((0.1, 1 - 2 / 9))
    roc_points = {tuple(np.round(p, 12)) for p in lines["roc"].get_xydata()}
    assert tuple(np.round(chosen, 12)) in roc_points
    fr = lines["false_reject"].get_xydata()
    at = fr[np.argmin(np.abs(fr[:, 0] - t.image))]
    assert at[1] == pytest.approx(float(np.mean(held.good > at[0])))  # type: ignore[attr-defined]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_report_html_names_threshold_rates_and_nearest_misses(tmp_path: Path) -> None:
    from pouta.calibration.thresholds.report import write_report

    t, calib, held = _report_case(tmp_path)
    png, page = write_report(tmp_path / "m.int8.onnx", t, calib, held)  # type: ignore[arg-type]
    assert (png.name, page.name) == ("m.int8.onnx.oppoint.png", "m.int8.onnx.oppoint.html")
    img = cv2.imread(str(png))
    assert img is not None and img.shape[1] > 900 and img.shape[0] > 700  # plots + two thumbnail rows
    text = page.read_text()
    op = t.operating_point
    assert "image threshold</th><td>0.56 " in text
    assert f"false rejects &le; 5% with 95% confidence (order statistic {op['rank']} of 120 good" in text
    lo, hi = op["measured"]["false_reject"]["ci"]
    assert f"<td>1 / 10</td><td>10%</td><td>{100 * lo:.3g}% - {100 * hi:.3g}%</td>" in text
    assert "escapes: crack</td><td>1 / 4</td>" in text and "escapes: spot</td><td>1 / 5</td>" in text
    rows = [r for r in text.split("<tr>") if r.startswith("<td>good</td>") or r.startswith("<td>defect</td>")]
    # Worst first: the good part at 0.62 (rejected) then 0.52; the defect at 0.49 (escaped) then 0.55.
    assert rows[0].startswith("<td>good</td><td>good</td><td>p004.png</td><td>0.62</td>") and "NG" in rows[0]
    assert rows[1].startswith("<td>good</td><td>good</td><td>p002.png</td><td>0.52</td>")
    defect_rows = [r for r in rows if r.startswith("<td>defect</td>")]
    assert defect_rows[0].startswith("<td>defect</td><td>crack</td><td>p002.png</td><td>0.49</td>")
    assert defect_rows[1].startswith("<td>defect</td><td>spot</td><td>p003.png</td><td>0.55</td>")
    assert len(rows) == 12 and 'src="data:image/png;base64,' in text
