"""Does watching slow inspection? fps with N live-view clients vs none.

``python -m pouta.benchmarks.sections.liveview_load [--model M.onnx] [--clients 5] [--seconds 8] [--rounds 3]``

The edge pipeline replays in-memory frames (``block`` policy: fps is what the runtime
sustains) with the files sink, the live view and the metrics sink attached, in
alternating runs without and with clients (ABBA order, so a slow drift of the host's
load does not favour one side). The clients run in a separate process and behave like
the page: each holds the event stream open, fetches the live picture whenever an event
announces a new one (one fetch at a time), fetches new NG thumbnails, and one of them
scrapes ``/metrics`` every second. Without ``--model`` a randomly initialised ``tiny``
POUTA is exported at 128x128 (needs the [train] extra) and calibrated on synthetic parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def default_model(work: Path, size: int = 128) -> Path:
    from pouta.calibration.cli import calibrate_main

    from .. import models
    from ..synthetic import make_image_folder

    model, cfg = models.random_model("tiny", size, size)
    path = models.export(model, cfg, work / "tiny.onnx", size, size)
    calib = make_image_folder(work / "calib", n=16, size=size)
    if calibrate_main([str(path), "--calib", str(calib)]) != 0:
        raise SystemExit("calibration of the benchmark model failed")
    return path


def frames(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    from ..synthetic import _defect, _part

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = _part(rng, size)
        out.append(_defect(img, rng)[0] if i % 5 == 4 else img)  # every fifth part has a defect
    return out


def one_run(
    model: Path, images: list[np.ndarray], seconds: float, clients: int, work: Path, threads: int = 1
) -> dict[str, Any]:
    from pouta.edge.config import build_pipeline, load_config
    from pouta.edge.liveview.server import attach_http
    from pouta.edge.sources.replay import ArraySource

    out = work / f"out-{time.monotonic_ns()}"
    cfg = load_config(
        None,
        {
            # One intra-op thread, no busy-wait: the small-CPU-box setting the README recommends.
            "model": {"path": str(model), "threads": threads, "spin": False},
            "output": {"dir": str(out), "fsync": False},
            "pipeline": {"policy": "block", "duration": seconds},
            "http": {"enabled": True, "listen": "127.0.0.1:0"},
        },
    )
    pipe = build_pipeline(cfg, source=ArraySource(images, count=10**9))
    server = attach_http(pipe, cfg)
    proc = None
    try:
        if clients:
            cmd = [sys.executable, "-m", "pouta.benchmarks.sections.liveview_load", "--client", server.url]
            proc = subprocess.Popen([*cmd, "--clients", str(clients)], stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)  # clients connected and streaming before the timed run starts
        s = pipe.run()
        view = next(sk for sk in pipe.sinks if getattr(sk, "name", "") == "liveview").stats()
    finally:
        client_stats: dict[str, Any] = {}
        if proc is not None:
            proc.terminate()
            text, _ = proc.communicate(timeout=30)
            if text.strip():
                client_stats = json.loads(text.strip().splitlines()[-1])
        server.close()
        pipe.backend.close()
    return {"fps": s["mean_fps"], "processed": s["processed"], "view": view, "clients": client_stats}


async def _client(base: str, stats: dict[str, int], scrape: bool, stop: asyncio.Event) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:

        async def metrics() -> None:
            while not stop.is_set():
                async with http.get(base + "metrics") as r:
                    await r.read()
                stats["scrapes"] += 1
                await asyncio.sleep(1.0)

        task = asyncio.ensure_future(metrics()) if scrape else None
        seen_picture, seen_ng = -1, set()
        async with http.get(base + "api/events", timeout=aiohttp.ClientTimeout(total=None)) as r:
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    data = [line[6:] for line in event.split(b"\n") if line.startswith(b"data: ")]
                    if not data:
                        continue
                    state = json.loads(data[0])
                    stats["events"] += 1
                    if state["picture"]["version"] != seen_picture and state["picture"]["seq"] is not None:
                        seen_picture = state["picture"]["version"]
                        async with http.get(base + "api/frame.jpg") as p:
                            stats["picture_bytes"] += len(await p.read())
                        stats["pictures"] += 1
                    for rec in state["ng"]:
                        if rec["thumb"] and rec["seq"] not in seen_ng:
                            seen_ng.add(rec["seq"])
                            async with http.get(f"{base}api/ng/{rec['seq']}/thumb.jpg") as p:
                                await p.read()
                            stats["thumbs"] += 1
        if task is not None:
            task.cancel()


async def _clients(base: str, n: int) -> dict[str, int]:
    import signal

    stats = {"events": 0, "pictures": 0, "picture_bytes": 0, "thumbs": 0, "scrapes": 0}
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.ensure_future(_client(base, stats, i == 0, stop)) for i in range(n)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pouta.benchmarks.sections.liveview_load", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--model", type=Path, help="contract ONNX with calibrated thresholds (default: tiny POUTA)"
    )
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of one timed run")
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds (each: none, clients, clients, none)")
    ap.add_argument("--size", type=int, default=640, help="camera frame size (square) replayed")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.client:
        print(json.dumps(asyncio.run(_clients(a.client, a.clients))), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="pouta-liveview-load-") as tmp:
        work = Path(tmp)
        model = a.model or default_model(work)
        images = frames(20, a.size)
        one_run(model, images, 2.0, 0, work, a.threads)  # warm-up: page cache, ONNX Runtime arenas
        fps: dict[int, list[float]] = {0: [], a.clients: []}
        last: dict[str, Any] = {}
        for _ in range(a.rounds):
            for n in (0, a.clients, a.clients, 0):
                r = one_run(model, images, a.seconds, n, work, a.threads)
                fps[n].append(r["fps"])
                print(
                    f"clients {n}: {r['fps']:.2f} fps ({r['processed']} parts)  {r['clients'] or ''}",
                    flush=True,
                )
                if n:
                    last = r
        base, loaded = statistics.median(fps[0]), statistics.median(fps[a.clients])
        drop = 100.0 * (base - loaded) / base
        print(
            f"median fps: no clients {base:.2f}, {a.clients} clients {loaded:.2f}: drop {drop:+.2f} % "
            f"(live pictures drawn {last.get('view', {}).get('rendered')}, model {model.name}, "
            f"frames {a.size}x{a.size})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
