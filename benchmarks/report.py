"""``report.md`` and the console summary, written from ``results.json`` alone.

Everything here reads the results dict, never re-measures, so a report can be rebuilt
from a saved JSON (``report_charts.write_charts`` + ``markdown``).

Longer than ~350 lines on purpose: one markdown writer per section, in report order;
the charts are in ``report_charts``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import KINDS, PAPER, PAPER_LATENCY_RATIO, TARGET_LATENCY_RATIO, Result

STATUS_OK = ("ok", "partial")


def _f(v: Any, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "-"
    return fmt.format(v * scale)


def _met(v: Any) -> str:
    return {True: "met", False: "NOT met"}.get(v, "n/a")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _status_line(sec: Result) -> list[str]:
    status = sec.get("status", "?")
    if status in STATUS_OK:
        return []
    return [f"**{status}**: {sec.get('error', '')}", ""]


# -- markdown ---------------------------------------------------------------------------


def markdown(res: Result) -> str:
    m, opts = res.get("machine", {}), res.get("options", {})
    lines = [
        "# POUTA vs vanilla: cost, latency, accuracy",
        "",
        "Reproduce with:",
        "",
        "```",
        res.get("command", ""),
        "```",
        "",
        f"- Date: {res.get('date_utc', '')}"
        + (" (quick mode: smoke run, numbers not meaningful)" if opts.get("quick") else ""),
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores_usable', '?')} usable cores, "
        f"{m.get('threads', '?')} threads for PyTorch/ONNX Runtime, load average (1 min) at start "
        f"{m.get('load_avg_1m', '?')}; GPU: {m.get('gpu') or 'none'}; OS: {m.get('os', '?')}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items()),
        f"- Total time: {res.get('total_seconds', '?')} s",
        "",
        "Ratios (POUTA/vanilla, INT8/FP32) are the numbers to read: both sides are measured in one "
        "interleaved loop, so load from other processes hits them alike; absolute milliseconds depend "
        "on the machine and its load.",
        "",
        "## Sections",
        "",
    ]
    for name, sec in res.get("sections", {}).items():
        err = f": {sec.get('error')}" if sec.get("error") else ""
        lines.append(f"- {name}: **{sec.get('status', '?')}** ({sec.get('seconds', 0)} s){err}")
    lines += ["", "## Targets", ""]
    targets = res.get("targets", [])
    if targets:
        lines += _table(
            ["target", "value", "status", "note"],
            [
                [t["target"], str(t.get("value") or "-"), _met(t.get("met")), t.get("note", "")]
                for t in targets
            ],
        )
    else:
        lines.append("No target could be evaluated (see the sections below).")
    lines.append("")
    secs = res.get("sections", {})
    lines += _cost_md(secs.get("cost", {}), res.get("charts", {}))
    lines += _latency_md(secs.get("latency", {}), res.get("charts", {}))
    lines += _accuracy_md(secs.get("accuracy", {}), res.get("charts", {}))
    lines += _e2e_md(secs.get("e2e", {}))
    if secs.get("quality", {}).get("rows"):
        from .sections.quality import markdown as quality_md

        lines += ["## Quality over the real categories", "", *quality_md(secs["quality"]), ""]
    return "\n".join(lines) + "\n"


def _cost_md(sec: Result, charts: dict[str, str]) -> list[str]:
    lines = ["## 1. Params and FLOPs (paper Table 5)", ""]
    lines += _status_line(sec)
    rows = sec.get("rows", {})
    if not rows:
        return lines
    lines += [
        f"Preset `{sec.get('preset')}`, input {sec.get('height')}x{sec.get('width')}, batch 1, counted with "
        f"`{next((r.get('source') for r in rows.values() if r.get('source')), '?')}`. "
        "**MACs** are multiply-accumulates; **FLOPs** here are true FLOPs = 2 x MACs "
        "(`torch.utils.flop_counter.FlopCounterMode`). thop/fvcore/ptflops print MACs and call them "
        "FLOPs, which is what the paper's 35.37G/39.38G most likely are: compare the paper's column "
        "with our **MACs**.",
        "",
    ]
    table = []
    for name in ("pouta", "vanilla"):
        r = rows.get(name, {})
        p = PAPER[name]
        table.append(
            [
                name,
                _f(r.get("params"), "{:.2f}M", 1e-6),
                f"{p['params'] / 1e6:.2f}M",
                _f(r.get("params", 0) / p["params"] - 1 if r.get("params") else None, "{:+.1%}"),
                _f(r.get("macs"), "{:.2f}G", 1e-9),
                _f(r.get("flops"), "{:.2f}G", 1e-9),
                f"{p['flops'] / 1e9:.2f}G",
                _f(r.get("macs", 0) / p["flops"] - 1 if r.get("macs") else None, "{:+.1%}"),
                r.get("error", ""),
            ]
        )
    table.append(
        [
            "POUTA/vanilla",
            _f(sec.get("params_ratio"), "{:.3f}"),
            _f(sec.get("paper_params_ratio"), "{:.3f}"),
            "",
            _f(sec.get("flop_ratio"), "{:.3f}"),
            _f(sec.get("flop_ratio"), "{:.3f}"),
            _f(sec.get("paper_flop_ratio"), "{:.3f}"),
            "",
            "",
        ]
    )
    lines += _table(
        [
            "model",
            "params",
            "paper params",
            "vs paper",
            "MACs",
            "FLOPs (2xMAC)",
            "paper 'FLOPs'",
            "MACs vs paper",
            "error",
        ],
        table,
    )
    lines += ["", "Ablation variants (same preset and input):", ""]
    abl = []
    for name in ("pouta-base", "pouta-hsg", "pouta-mss", "pouta", "vanilla"):
        r = rows.get(name, {})
        abl.append(
            [
                name if name != "pouta" else "pouta (full)",
                _f(r.get("params"), "{:.3f}M", 1e-6),
                _f(r.get("macs"), "{:.2f}G", 1e-9),
                _f(r.get("flops"), "{:.2f}G", 1e-9),
                r.get("error", ""),
            ]
        )
    lines += _table(["variant", "params", "MACs", "FLOPs (2xMAC)", "error"], abl)
    lines += [
        "",
        "Params count every weight of the model as built for training (MSS heads and the "
        "reconstruction head included where the model has them); MACs/FLOPs are counted by the trainer's "
        "`model_cost` at batch 1.",
        "",
    ]
    if charts.get("cost"):
        lines += [f"![params and FLOPs vs paper]({charts['cost']})", ""]
    return lines


def _latency_md(sec: Result, charts: dict[str, str]) -> list[str]:
    lines = ["## 2. Latency, POUTA vs vanilla", ""]
    lines += _status_line(sec)
    bes = sec.get("backends", {})
    if not bes:
        return lines
    plan = sec.get("plan", {})
    lines += [
        f"Preset `{sec.get('preset')}`, input {sec.get('height')}x{sec.get('width')}, random input in [0,1], "
        f"randomly initialised weights (latency does not depend on them). {plan.get('warmup')} warm-up "
        f"iterations, then up to {plan.get('iters')} timed iterations (at least {plan.get('min_iters')}; "
        f"stops after {plan.get('budget_s')} s per backend and batch), POUTA and vanilla alternating "
        f"(ABBA), with an untimed {1000 * float(plan.get('settle_s') or 0):.0f} ms pause before each call "
        "(ONNX Runtime's worker threads spin after a run; without the pause the next session "
        "in the loop is billed for them). "
        f"Threads: {sec.get('threads')} (torch reports {sec.get('torch_threads')}). "
        "Time per batch in ms; p99 of fewer than 100 samples is close to the maximum. "
        "`ratio` = POUTA median / vanilla median; `paired` = median of per-iteration ratios "
        f"(paper: 32/52 = {PAPER_LATENCY_RATIO:.2f}).",
        "",
    ]
    rows = []
    for name, be in bes.items():
        if be.get("status") not in STATUS_OK:
            continue
        for b, r in be.get("batches", {}).items():
            p, v = r.get("pouta", {}), r.get("vanilla", {})
            rows.append(
                [
                    name,
                    b,
                    _f(p.get("median_ms")),
                    _f(p.get("p99_ms")),
                    _f(v.get("median_ms")),
                    _f(v.get("p99_ms")),
                    _f(r.get("ratio_median"), "{:.3f}"),
                    _f(r.get("ratio_paired"), "{:.3f}"),
                    str(p.get("n", v.get("n", "-"))),
                    _met(
                        None if r.get("ratio_median") is None else r["ratio_median"] <= TARGET_LATENCY_RATIO
                    ),
                    r.get("error", ""),
                ]
            )
    lines += _table(
        [
            "backend",
            "batch",
            "POUTA median",
            "POUTA p99",
            "vanilla median",
            "vanilla p99",
            "ratio",
            "paired",
            "n",
            "<= 0.70",
            "error",
        ],
        rows,
    )
    q, qp = sec.get("int8_fp32_ratio", {}), sec.get("int8_fp32_ratio_paired", {})
    if any(v is not None for d in q.values() for v in d.values()):
        lines += [
            "",
            "ONNX Runtime CPU INT8 (u8s8) / FP32 latency, ratio of medians (paired: median of per-iteration "
            "ratios; FP32 and INT8 are timed in the same interleaved loop). Target <= 0.5:",
            "",
        ]
        lines += _table(
            ["batch", *(f"{k} (paired)" for k in KINDS)],
            [
                [b, *(f"{_f(d.get(k), '{:.3f}')} ({_f(qp.get(b, {}).get(k), '{:.3f}')})" for k in KINDS)]
                for b, d in q.items()
            ],
        )
    missing = [(n, be) for n, be in bes.items() if be.get("status") not in STATUS_OK]
    if missing:
        lines += ["", "Backends not measured:", ""]
        lines += [f"- `{n}`: {be.get('status')}: {be.get('error', '')}" for n, be in missing]
    lines.append("")
    if charts.get("latency"):
        lines += [f"![latency per backend]({charts['latency']})", ""]
    return lines


def _accuracy_md(sec: Result, charts: dict[str, str]) -> list[str]:
    lines = ["## 3. Accuracy beside cost", ""]
    lines += _status_line(sec)
    rows = sec.get("rows", {})
    if not rows:
        return lines
    lines += [
        f"Data: `{sec.get('data')}` (test split). Both models trained with preset `{sec.get('preset')}` "
        f"under the same budget: {sec.get('train_minutes')} min or {sec.get('train_steps_max')} steps, "
        "whichever comes first (or reused from --checkpoints). INT8 = ONNX Runtime u8s8 calibrated on "
        "normal training images. Latency: ONNX Runtime CPU, batch 1, median of the four artifacts timed "
        "interleaved.",
        "",
    ]
    for kind, t in sec.get("training", {}).items():
        how = "reused" if t.get("reused") else f"trained {t.get('train_seconds', '?')} s"
        if t.get("untrained"):
            how = "UNTRAINED (--train-steps 0): accuracy is meaningless"
        lines.append(f"- {kind}: `{t.get('checkpoint')}` ({how}, {t.get('steps', '?')} steps)")
    lines.append("")
    table = []
    for name, r in rows.items():
        table.append(
            [
                name,
                f"{r.get('height', '?')}x{r.get('width', '?')}",
                _f(r.get("params"), "{:.3f}M", 1e-6),
                _f(r.get("macs"), "{:.2f}G", 1e-9),
                _f(r.get("ort_cpu_b1_median_ms")),
                _f(r.get("image_auroc"), "{:.3f}"),
                _f(r.get("pixel_auroc"), "{:.3f}"),
                _f(r.get("pixel_ap"), "{:.3f}"),
                r.get("error", ""),
            ]
        )
    lines += _table(
        [
            "model",
            "input",
            "params",
            "MACs",
            "ORT CPU b1 ms",
            "image AUROC",
            "pixel AUROC",
            "pixel AP",
            "error",
        ],
        table,
    )
    lr = sec.get("int8_fp32_latency_ratio", {})
    if any(isinstance(v, float) for v in lr.values()):
        lines += [
            "",
            "INT8/FP32 ORT CPU batch-1 latency of these artifacts: "
            + ", ".join(f"{k} {_f(v, '{:.3f}')}" for k, v in lr.items()),
        ]
    d = sec.get("int8_minus_fp32", {})
    if d:
        lines += ["", "INT8 minus FP32 (ONNX Runtime):", ""]
        lines += _table(
            ["model", "image AUROC", "pixel AUROC", "pixel AP"],
            [
                [k, *(_f(v.get(m), "{:+.4f}") for m in ("image_auroc", "pixel_auroc", "pixel_ap"))]
                for k, v in d.items()
            ],
        )
    lines.append("")
    if charts.get("accuracy"):
        lines += [f"![accuracy vs cost]({charts['accuracy']})", ""]
    return lines


def _e2e_md(sec: Result) -> list[str]:
    lines = ["## 4. Edge runtime end to end", ""]
    lines += _status_line(sec)
    rows = sec.get("rows", {})
    if not rows:
        return lines
    lines += [
        f"Folder `{sec.get('frames')}` replayed as a camera (looped) through the edge `Pipeline` at "
        f"{sec.get('height')}x{sec.get('width')}, {sec.get('threads')} threads, `block` policy (no drops: "
        "fps is what the runtime sustains), results written to disk (JSON/CSV, overlays of NG parts). "
        "Stage times are medians per frame in ms (source = file read + decode; the stages overlap in "
        "three threads, so fps is not 1000 / their sum).",
        "",
    ]
    table = []
    for name, r in rows.items():
        st = r.get("stages_median_ms", {})
        tot = r.get("total_ms") or {}
        table.append(
            [
                name,
                str(r.get("frames", "-")),
                _f(r.get("fps"), "{:.2f}"),
                *(_f(st.get(s)) for s in ("source", "preprocess", "backend", "postprocess", "write")),
                _f(tot.get("p50")),
                r.get("error", ""),
            ]
        )
    lines += _table(
        [
            "model",
            "frames",
            "fps",
            "source",
            "preprocess",
            "backend",
            "postprocess",
            "write",
            "total p50",
            "error",
        ],
        table,
    )
    ov = [(n, r["runtime_overhead"]) for n, r in rows.items() if isinstance(r.get("runtime_overhead"), dict)]
    if ov:
        lines += [
            "",
            "`measure_overhead` (synthetic frames at model size): runtime overhead over the pure backend call, "
            "and the drop test (camera 3x faster than inference, drop-oldest; lost result files must be 0):",
            "",
        ]
        table = []
        for name, o in ov:
            d = o.get("drop_test") or {}
            table.append(
                [
                    name,
                    _f((o.get("pure_backend_ms") or {}).get("p50")),
                    _f((o.get("overhead_ms") or {}).get("p50")),
                    _f((o.get("overhead_vs_pure_ms") or {}).get("p50")),
                    _f(o.get("throughput_fps"), "{:.2f}"),
                    f"{d.get('dropped', '-')}/{d.get('acquired', '-')}",
                    str(d.get("lost_result_files", "-")),
                    o.get("error", ""),
                ]
            )
        lines += _table(
            [
                "model",
                "pure backend p50",
                "pre+post p50",
                "in-pipeline minus pure p50",
                "fps",
                "dropped/acquired",
                "lost files",
                "error",
            ],
            table,
        )
    lines.append("")
    return lines


# -- console summary ----------------------------------------------------------------------


def summary(res: Result) -> str:
    lines = [f"pouta-bench: {res.get('command', '')}"]
    for name, sec in res.get("sections", {}).items():
        extra = f": {sec.get('error')}" if sec.get("error") else ""
        lines.append(f"  {name:9s} {sec.get('status')}{extra}")
    for t in res.get("targets", []):
        lines.append(f"  [{_met(t.get('met')):7s}] {t['target']}: {t.get('value') or '-'}")
    out = Path(res.get("options", {}).get("out", "."))
    lines.append(f"  report: {out / 'report.md'}")
    return "\n".join(lines)
