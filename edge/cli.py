"""``pouta-edge``: run | capture | cameras | install-service | hash-password | doctor.

Exit codes (documented in ``--help`` and docs/security.md too; the systemd unit restarts
on every one but 0 and 2):
  0  finished (end of input, --max-frames/--duration reached, or stopped by SIGINT/SIGTERM
     after flushing every pending result)
  1  unexpected internal error
  2  invalid usage, config or model (metadata mismatch, missing/corrupt/modified file, bad value)
  3  the frame source could not be opened (camera not found, no producer, no images)
  4  finished, but some result files could not be written (kept in memory, counted)
  5  a port could not be bound (network not up yet, port taken): retried by the unit

Signal handlers are installed before the model loads: SIGTERM/SIGINT during a slow load
end the run cleanly (exit 0) once it is built, SIGHUP then is a reload, never a kill.

Longer than ~350 lines on purpose: argparse for every command plus the run loop's
signal handling; the pieces are small and only the CLI uses them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .contract.errors import PoutaError, UnavailableError
from .sources.protocol import SourceError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_SOURCE = 3
EXIT_WRITE_ERRORS = 4
EXIT_UNAVAILABLE = 5

EPILOG = """exit codes:
  0  finished, or stopped by SIGINT/SIGTERM after flushing pending results
  1  unexpected internal error
  2  invalid usage, config or model (e.g. metadata mismatch)
  3  frame source could not be opened
  4  finished, but some result files could not be written
  5  a port could not be bound (network not up yet, port taken); worth a restart
"""


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frame source (one of)")
    g.add_argument("--images", metavar="DIR|GLOB", help="replay an image folder (recursive) or glob")
    g.add_argument("--video", metavar="FILE", help="video file through OpenCV")
    g.add_argument("--uvc", metavar="N", type=int, help="UVC/V4L2 camera index through OpenCV")
    g.add_argument("--camera", metavar="N|sim", help="GenICam camera index, or 'sim' for viky.cti")
    g.add_argument("--camera-serial", metavar="S", help="GenICam camera by serial number")
    g.add_argument("--camera-id", metavar="ID", help="GenICam camera by device id")
    g.add_argument("--cti", metavar="FILE", help="GenTL producer (default: $GENICAM_GENTL64_PATH)")
    g.add_argument("--pixel-format", help="GenICam PixelFormat, e.g. Mono8, BayerRG8, RGBa8")
    g.add_argument(
        "--trigger",
        metavar="off|software|lineN",
        help="GenICam FrameStart trigger: off (free-running), software, or an input line (line0, line1, ...)",
    )
    g.add_argument(
        "--trigger-activation",
        metavar="EDGE",
        help="line trigger edge/level: RisingEdge (default), FallingEdge, AnyEdge, LevelHigh, LevelLow",
    )
    g.add_argument(
        "--software-trigger",
        action="store_true",
        default=None,
        help="deprecated: same as --trigger software",
    )
    g.add_argument("--strobe-line", metavar="LineN", help="GenICam output line pulsed on every NG part")
    g.add_argument("--strobe-ms", type=float, metavar="MS", help="NG strobe pulse length (default 50)")
    g.add_argument("--fps", type=float, help="replay rate for --images/--video")
    g.add_argument("--loop", action="store_true", default=None, help="replay --images/--video forever")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config key, e.g. pipeline.queue_size=8 or postprocess.min_area=25 (repeatable)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the merged configuration (YAML) and exit"
    )


def _source_overrides(a: argparse.Namespace) -> dict[str, Any]:
    s: dict[str, Any] = {}
    if a.images:
        s.update(kind="images", path=a.images)
    elif a.video:
        s.update(kind="video", path=a.video)
    elif a.uvc is not None:
        s.update(kind="uvc", camera=a.uvc)
    elif a.camera is not None or a.camera_serial or a.camera_id:
        s.update(kind="genicam", camera=a.camera, serial=a.camera_serial, device_id=a.camera_id)
    for key, val in (
        ("cti", a.cti),
        ("pixel_format", a.pixel_format),
        ("trigger", a.trigger),
        ("trigger_activation", a.trigger_activation),
        ("software_trigger", a.software_trigger),
        ("fps", a.fps),
        ("loop", a.loop),
    ):
        if val is not None:
            s[key] = val
    strobe = {k: v for k, v in (("line", a.strobe_line), ("pulse_ms", a.strobe_ms)) if v is not None}
    if strobe:
        s["strobe"] = strobe
    return s


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pouta-edge",
        description="Line-side anomaly inspection: frames in, OK/NG result files out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="inspect parts", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run.add_argument(
        "--config", metavar="YAML", help="run config (defaults: pouta/edge/configs/default.yaml)"
    )
    _add_config_args(run)
    run.add_argument("--model", "--engine", dest="model", metavar="FILE", help=".onnx or .plan/.engine model")
    run.add_argument("--providers", help="ONNX Runtime providers, comma separated (default CPU)")
    run.add_argument("--threads", type=int)
    run.add_argument(
        "--no-spin",
        dest="spin",
        action="store_false",
        default=None,
        help="ONNX Runtime workers sleep between frames instead of busy-waiting (frees CPU)",
    )
    run.add_argument("--expect-kind", help="refuse a model whose metadata model_kind differs")
    run.add_argument("--expect-precision", help="refuse a model whose metadata precision differs")
    run.add_argument(
        "--allow-modified-model",
        dest="allow_modified",
        action="store_true",
        default=None,
        help="run a model whose sha256 differs from its sidecar's artifact_sha256 (warns)",
    )
    run.add_argument(
        "--shadow",
        metavar="FILE",
        help="candidate model judged beside the live one, never deciding (shadow/)",
    )
    _add_source_args(run)
    run.add_argument("--roi", help="x,y,width,height crop in source pixels")
    run.add_argument("--out", metavar="DIR", help="result folder")
    run.add_argument("--overlays", choices=("ng", "all", "none"))
    run.add_argument("--no-fsync", action="store_true", help="skip fsync (faster, not power-loss safe)")
    run.add_argument("--policy", choices=("drop-oldest", "block"))
    run.add_argument("--queue-size", type=int)
    run.add_argument("--max-frames", type=int)
    run.add_argument("--duration", type=float, help="seconds")
    run.add_argument("--quiet", action="store_true", help="no live status line")
    run.add_argument(
        "--modbus",
        type=int,
        metavar="PORT",
        help="serve results as Modbus TCP on modbus.host (127.0.0.1 unless set):PORT (pip '.[plc]')",
    )
    run.add_argument(
        "--opcua",
        metavar="URL",
        help="serve results over OPC UA, e.g. opc.tcp://127.0.0.1:4840/pouta/ (docs/security.md)",
    )
    run.add_argument(
        "--mqtt", metavar="HOST[:PORT]", help="publish results to an MQTT broker (pip '.[mqtt]')"
    )
    run.add_argument("--mqtt-topic", metavar="PREFIX", help="MQTT topic prefix (default pouta/edge)")
    run.add_argument("--summary-json", metavar="FILE", help="also write the final summary as JSON")
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the live view and /metrics, e.g. 127.0.0.1:8080; beyond loopback needs a token (pip '.[ui]')",
    )
    run.add_argument(
        "--http-token-file",
        metavar="FILE",
        help="file holding the live view token (never the token itself on the command line: ps shows it)",
    )
    run.add_argument(
        "--http-hold", type=float, metavar="S", help="keep serving S seconds after the input ends (replays)"
    )

    cap = sub.add_parser("capture", help="save camera frames (normal parts) for training")
    _add_source_args(cap)
    cap.add_argument("--frames", type=int, default=50)
    cap.add_argument("--out", required=True, metavar="DIR")
    cap.add_argument("--format", choices=("png", "bmp", "tif"), default="png")

    cams = sub.add_parser("cameras", help="list the GenICam devices of a producer")
    cams.add_argument("--cti", metavar="FILE|sim")

    svc = sub.add_parser("install-service", help="write a systemd unit that runs 'run --config FILE' at boot")
    svc.add_argument("--config", required=True, metavar="YAML", help="run config naming model and source")
    svc.add_argument("--unit-dir", default="/etc/systemd/system", metavar="DIR")
    svc.add_argument("--name", default="pouta-edge", help="unit name (default pouta-edge)")
    svc.add_argument(
        "--user",
        default="pouta-edge",
        help="run as this system user (default pouta-edge; 'root' not recommended)",
    )
    svc.add_argument("--memory-max", default="4G", help="MemoryMax of the unit (default 4G)")
    svc.add_argument("--dry-run", action="store_true", help="print the unit, write nothing")
    svc.add_argument("--enable", action="store_true", help="then systemctl daemon-reload and enable --now")

    sub.add_parser(
        "hash-password",
        help="read a password (stdin or prompt) and print its hash for an OPC UA users file",
    )
    prom = sub.add_parser(
        "promote", help="swap the shadow model of a running 'run --shadow' in (again: roll back)"
    )
    prom.add_argument("--pid", type=int, required=True, help="process id of the running pouta-edge run")

    doc = sub.add_parser("doctor", help="check TensorRT/CUDA on this machine (run first on a new Jetson)")
    doc.add_argument("--plan", metavar="FILE", help="also try to open this .plan/.engine")
    return ap


def _run_overrides(a: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    m = {
        k: v
        for k, v in (
            ("path", a.model),
            ("threads", a.threads),
            ("spin", a.spin),
            ("expect_kind", a.expect_kind),
            ("expect_precision", a.expect_precision),
            ("allow_modified", a.allow_modified),
            ("providers", a.providers.split(",") if a.providers else None),
        )
        if v is not None
    }
    if m:
        o["model"] = m
    s = _source_overrides(a)
    if s:
        o["source"] = s
    if a.shadow:
        o["shadow"] = {"path": a.shadow}
    if a.roi:
        o["preprocess"] = {"roi": a.roi}
    out = {
        k: v
        for k, v in (("dir", a.out), ("overlays", a.overlays), ("fsync", False if a.no_fsync else None))
        if v is not None
    }
    if out:
        o["output"] = out
    pl = {
        k: v
        for k, v in (
            ("policy", a.policy),
            ("queue_size", a.queue_size),
            ("max_frames", a.max_frames),
            ("duration", a.duration),
        )
        if v is not None
    }
    if pl:
        o["pipeline"] = pl
    if a.modbus is not None:
        o["modbus"] = {"enabled": True, "port": a.modbus}
    if a.opcua:
        o["opcua"] = {"enabled": True, "endpoint": a.opcua}
    if a.mqtt or a.mqtt_topic:
        host, _, port = (a.mqtt or "localhost").partition(":")
        o["mqtt"] = {"enabled": True, "host": host, **({"port": int(port)} if port else {})}
        if a.mqtt_topic:
            o["mqtt"]["topic_prefix"] = a.mqtt_topic
    http = {
        k: v
        for k, v in (("listen", a.http), ("token_file", a.http_token_file), ("hold_s", a.http_hold))
        if v is not None
    }
    if a.http:
        http["enabled"] = True
    if http:
        o["http"] = http
    return o


def _print_summary(s: dict[str, Any], out_dir: str) -> None:
    from .stats import FPS_WINDOW

    lat = s["latency_ms"].get("total", {"p50": 0.0, "p99": 0.0})
    lines = [
        f"parts {s['processed']}  OK {s['ok']}  NG {s['ng']}  fps {s['fps']:.1f} (last {FPS_WINDOW} parts; "
        f"{s['mean_fps']:.1f} over the run incl. start-up)  latency p50 {lat['p50']:.1f} ms "
        f"p99 {lat['p99']:.1f} ms (capture to result, queueing included)",
        f"dropped {s['dropped']}  corrupt {s['corrupt']}  timeouts {s['timeouts']}  reconnects "
        f"{s['reconnects']}  frame errors {s['frame_errors']}  write errors {s['write_errors']}",
        f"not inspected {s['not_inspected']}  backlog dropped {s['backlog_dropped']}  "
        f"records lost {s['records_lost']}  late verdicts {s['late_verdicts']}  faults {s['faults']}"
        + (f" (active: {s['fault']})" if s["fault"] else "")
        + "  sinks "
        + "  ".join(f"{k}: {v['delivered']} delivered" for k, v in s["sinks"].items()),
    ]
    if s["labelled"]:
        lines.append(
            f"verdicts right {s['correct']} / {s['labelled']} ({100.0 * s['correct'] / s['labelled']:.1f}%), "
            f"wrong {s['labelled'] - s['correct']}"
        )
    if "shadow" in s["sinks"]:
        from .sinks.shadow import summary_line

        lines.append(summary_line(s["sinks"]["shadow"]))
    lines.append(f"results in {out_dir}  (model {s['model_id']}, {s['backend']})")
    print("\n".join(lines), flush=True)


SECRET_KEYS = frozenset({"token", "password"})


def redacted(cfg: Any) -> Any:
    """The config with secret values hidden (what --print-config shows)."""
    if isinstance(cfg, dict):
        return {k: "<hidden>" if k in SECRET_KEYS and v is not None else redacted(v) for k, v in cfg.items()}
    return cfg


def cmd_run(a: argparse.Namespace) -> int:
    from .config import build_pipeline, load_config

    overrides = _run_overrides(a)
    cfg = load_config(a.config, overrides, a.set)
    if a.print_config:
        from .contract.settings import dump

        print(dump(redacted(cfg)), end="")
        return EXIT_OK
    # Before the model loads (which can take minutes for an engine): a SIGHUP then must be
    # a reload request, not a kill that systemd counts as a clean exit.
    sig = _Signals()
    try:
        with build_pipeline(cfg) as pipe:
            sig.pipe = pipe
            if sig.stopped.is_set():
                print(f"pouta-edge: stopped by {sig.stop_reason[0]} while loading", file=sys.stderr)
                return EXIT_OK
            return _run_pipeline(a, cfg, overrides, pipe, sig)
    finally:
        sig.restore()


class _Signals:
    """SIGINT/SIGTERM stop the pipeline (once it exists); SIGHUP asks for a reload, SIGUSR1
    for a shadow promotion."""

    def __init__(self) -> None:
        self.stop_reason: list[str] = []
        self.reloads: list[int] = []
        self.stopped = threading.Event()
        self.pipe: Any = None
        signals = [signal.SIGINT, signal.SIGTERM]
        signals += [getattr(signal, n) for n in ("SIGHUP", "SIGUSR1") if hasattr(signal, n)]
        self.previous = {s: signal.signal(s, self._on_signal) for s in signals}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum in (getattr(signal, "SIGHUP", None), getattr(signal, "SIGUSR1", None)):
            self.reloads.append(signum)  # handled in the main loop, outside the signal handler
            return
        self.stop_reason.append(signal.Signals(signum).name)
        self.stopped.set()
        if self.pipe is not None:
            self.pipe.stop()

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _run_pipeline(
    a: argparse.Namespace, cfg: dict[str, Any], overrides: dict[str, Any], pipe: Any, sig: _Signals
) -> int:
    """Run an open pipeline until its input ends or a signal stops it; print the summary."""
    from .service import SystemdWatchdog, sd_notify

    stop_reason, reloads, stopped = sig.stop_reason, sig.reloads, sig.stopped
    server: Any = None

    def reload() -> dict[str, Any]:
        from .service import reload_thresholds

        out = reload_thresholds(
            pipe, a.config, overrides, server.metrics.drift if server is not None else None, sets=a.set
        )
        print(
            f"thresholds reloaded: image {out['image_threshold']:.6g}, pixel {out['pixel_threshold']:.6g}",
            file=sys.stderr,
            flush=True,
        )
        return out

    if cfg["http"]["enabled"]:
        from .liveview.server import attach_http

        server = attach_http(pipe, cfg, reload)
    watchdog = SystemdWatchdog()
    try:
        from .contract.metadata import operating_point_line

        op = operating_point_line(pipe.backend.metadata.thresholds, pipe.post.image_threshold)
        if op:
            print(op, flush=True)
        pipe.start()
        sd_notify("READY=1")  # model loaded, every server listening
        interval = float(cfg["pipeline"]["status_interval"] or 1.0)
        live = not a.quiet and sys.stderr.isatty()
        next_status = 0.0
        while pipe.running:
            due = watchdog.due_in()
            pipe.join(timeout=interval if due is None else max(0.05, min(interval, due)))
            # Only while the inference thread comes round: a hung one stops the pings.
            stale_after = watchdog.limit_s / 2 if watchdog.limit_s else 0.0
            watchdog.ping(time.monotonic() - pipe.progress_at < stale_after)
            while reloads:
                try:
                    if reloads.pop() == getattr(signal, "SIGUSR1", None):
                        from .sinks.shadow import promote

                        print(promote(pipe)[1], file=sys.stderr, flush=True)
                        continue
                    reload()
                except PoutaError as exc:
                    print(f"pouta-edge: reload refused, thresholds unchanged: {exc}", file=sys.stderr)
            if stopped.is_set():
                sd_notify("STOPPING=1")
            if not a.quiet and time.monotonic() >= next_status:
                next_status = time.monotonic() + interval
                line = pipe.status_line()
                # One updating line on a terminal, plain lines in a log file.
                sys.stderr.write(f"\r{line}\033[K" if live else line + "\n")
                sys.stderr.flush()
        if live:
            sys.stderr.write("\n")
        hold = float(cfg["http"]["hold_s"] or 0) if server is not None else 0.0
        end = time.monotonic() + hold
        while not stopped.is_set() and time.monotonic() < end:
            stopped.wait(0.2)
    finally:
        if server is not None:
            server.close()
    summary = pipe.summary()
    summary["stopped_by"] = stop_reason[0] if stop_reason else None
    _print_summary(summary, cfg["output"]["dir"])
    if a.summary_json:
        from .contract.fsutil import atomic_write_json

        atomic_write_json(a.summary_json, summary)
    if pipe.fatal is not None:
        return EXIT_INTERNAL
    return EXIT_WRITE_ERRORS if summary["write_errors"] else EXIT_OK


def cmd_install_service(a: argparse.Namespace) -> int:
    from .service import install_service

    out = install_service(
        a.config,
        unit_dir=a.unit_dir,
        name=a.name,
        user=a.user,
        dry_run=a.dry_run,
        enable=a.enable,
        memory_max=a.memory_max,
    )
    if a.dry_run:
        print(out, end="")
    else:
        print(f"wrote {out}")
        if a.user and a.user != "root":
            print(f"the unit runs as '{a.user}': useradd --system --no-create-home {a.user} (once)")
        if not a.enable:
            print(f"next: systemctl daemon-reload && systemctl enable --now {a.name}.service")
    return EXIT_OK


def cmd_hash_password() -> int:
    from .auth import hash_password

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise PoutaError("hash-password: empty password")
    print(hash_password(password))
    return EXIT_OK


def cmd_capture(a: argparse.Namespace) -> int:
    import cv2

    from .config import load_config, make_source
    from .contract.fsutil import atomic_write_bytes
    from .contract.overlay import to_bgr8
    from .sources.protocol import FrameTimeout

    cfg = load_config(None, {"source": _source_overrides(a)})
    src = make_source(cfg["source"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    src.open()
    saved = failures = 0
    try:
        while saved < a.frames:
            try:
                frame = src.read()
            except (FrameTimeout, PoutaError) as exc:
                failures += 1
                print(f"skipped: {exc}", file=sys.stderr)
                if failures > 10 * a.frames:
                    break
                continue
            if frame is None:
                break
            img = frame.image
            # Keep 16-bit data as is; colour goes to BGR because that is what image files store.
            if img.ndim == 3:
                img = to_bgr8(img, frame.color_order)
            ok, buf = cv2.imencode(f".{a.format}", img)
            if not ok:
                raise PoutaError(f"cannot encode frame {frame.frame_id} as {a.format}")
            atomic_write_bytes(out / f"frame_{saved:06d}.{a.format}", buf.tobytes())
            saved += 1
    finally:
        src.close()
    print(f"saved {saved} frames to {out}")
    return EXIT_OK if saved == a.frames else EXIT_SOURCE


def cmd_cameras(a: argparse.Namespace) -> int:
    from .sources.genicam import list_cameras

    cams = list_cameras(a.cti)
    if not cams:
        print("no devices found")
        return EXIT_SOURCE
    for c in cams:
        print(json.dumps(c, default=str))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    t0 = time.perf_counter()
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "capture":
            return cmd_capture(args)
        if args.command == "install-service":
            return cmd_install_service(args)
        if args.command == "promote":
            from .sinks.shadow import signal_promote

            print(signal_promote(args.pid))
            return EXIT_OK
        if args.command == "hash-password":
            return cmd_hash_password()
        if args.command == "doctor":
            from .doctor import run_doctor

            return run_doctor(args.plan)
        return cmd_cameras(args)
    except SourceError as exc:
        print(f"pouta-edge: {exc}", file=sys.stderr)
        return EXIT_SOURCE
    except UnavailableError as exc:
        print(f"pouta-edge: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PoutaError as exc:
        print(f"pouta-edge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if args.verbose:
            print(f"took {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
