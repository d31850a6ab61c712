"""Running as a service: the systemd unit (``pouta-edge install-service``), sd_notify,
and the hot reload of thresholds (SIGHUP, ``systemctl reload``, or ``POST /api/reload``).

The unit runs ``pouta-edge run --config FILE`` with that file alone (so the file must
name the model and the source) as a dedicated user, ``Type=notify``: the runtime says
``READY=1`` once the model is loaded and every server listens, and ``WATCHDOG=1`` while
its inference thread makes progress, so a hung process is killed and restarted after
``WatchdogSec``. It restarts on failure but not after a config error (exit 2: restarting
cannot fix a typo); exit 3 (camera not found) and 5 (a port cannot be bound yet, e.g.
the NIC is not up) are retried. Hardening: ``NoNewPrivileges``, ``ProtectSystem=strict``
with ``ReadWritePaths`` for the output folder only, ``ProtectHome``, ``PrivateTmp``, an
empty capability set (``CAP_NET_BIND_SERVICE`` alone when a port below 1024 is
configured), ``MemoryMax``.

A reload re-reads the config file and the model's metadata sidecar and swaps the
post-processor in one assignment: the inference thread picks up either the old or the
new thresholds for a part, never a mix, and no part waits or is dropped.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contract.errors import ConfigError

if TYPE_CHECKING:
    from .drift import ScoreDrift
    from .pipeline import Pipeline

DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_USER = "pouta-edge"
EXIT_CONFIG = 2
WATCHDOG_SEC = 30
DEFAULT_MEMORY_MAX = "4G"

UNIT_TEMPLATE = """\
[Unit]
Description=pouta-edge line-side inspection ({config_name})
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
{user_lines}WorkingDirectory={workdir}
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
# Exit 2 is a config/model error: restarting cannot fix it. 3 (camera) and 5 (a port
# that cannot be bound yet) are retried, as are crashes and watchdog kills.
RestartPreventExitStatus={exit_config}
# No WATCHDOG=1 for this long (inference thread stuck): killed and restarted.
WatchdogSec={watchdog}
TimeoutStartSec=300
KillSignal=SIGTERM
TimeoutStopSec=60
Environment=PYTHONUNBUFFERED=1
StandardOutput=journal
StandardError=journal
SyslogIdentifier={name}
# Hardening: nothing but the output folder is writable, no privileges to gain.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
ReadWritePaths={rw_paths}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
{capabilities}MemoryMax={memory_max}

[Install]
WantedBy=multi-user.target
"""

_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_MEMORY_RE = re.compile(r"^[0-9]+[KMGT]?$|^[0-9]{1,2}%$|^infinity$")


def _check_unit_value(field: str, value: str) -> str:
    """Refuse what would break out of its unit line (newline, control characters) or be
    expanded by systemd (``%`` specifiers)."""
    if not value or any(not c.isprintable() for c in value) or "%" in value:
        raise ConfigError(f"{field}: expected printable text without '%' or newlines, got {value!r}")
    return value


def unit_text(
    config: Path,
    name: str = "pouta-edge",
    user: str | None = DEFAULT_USER,
    python: str | None = None,
    output_dir: Path | None = None,
    memory_max: str = DEFAULT_MEMORY_MAX,
    low_port: bool = False,
) -> str:
    """The unit for ``config`` (an absolute path); relative paths inside the config are
    resolved from the config's folder (the unit's working directory). ``user`` None or
    ``root``: runs as root (not recommended)."""
    exe = python or sys.executable
    for field, value in (("--config", str(config)), ("--name", name), ("python", exe)):
        _check_unit_value(field, value)
    if user is not None and not _USER_RE.match(user):
        raise ConfigError(f"--user: expected a system user name ([a-z_][a-z0-9_-]*), got {user!r}")
    if not _MEMORY_RE.match(memory_max):
        raise ConfigError(f"--memory-max: expected a size such as 4G or 2048M (or 50%), got {memory_max!r}")
    out = output_dir if output_dir is not None else config.parent / "results"
    _check_unit_value("output.dir", str(out))
    cmd = [exe, "-m", "pouta.edge.cli", "run", "--config", str(config), "--quiet"]
    user_lines = f"User={user}\nGroup={user}\n" if user and user != "root" else ""
    home = any(str(p).startswith(("/home/", "/root/")) for p in (config, out, Path(exe)))
    caps = "CAP_NET_BIND_SERVICE" if low_port else ""
    capabilities = f"CapabilityBoundingSet={caps}\n" + (f"AmbientCapabilities={caps}\n" if caps else "")
    return UNIT_TEMPLATE.format(
        config_name=config.name,
        user_lines=user_lines,
        workdir=str(config.parent),
        exec_start=shlex.join(cmd),
        exit_config=EXIT_CONFIG,
        watchdog=WATCHDOG_SEC,
        name=name,
        # A config, model or venv under /home stays readable; only the output is writable.
        protect_home="read-only" if home else "yes",
        rw_paths=shlex.quote(str(out)),
        capabilities=capabilities,
        memory_max=memory_max,
    )


def check_service_config(config: Path) -> dict[str, Any]:
    """The config must stand on its own: the service gets no other flags."""
    from .config import load_config

    cfg = load_config(config)
    if not cfg["model"]["path"]:
        raise ConfigError(f"{config}: model.path is not set (the service runs with this config alone)")
    if not cfg["source"]["kind"]:
        raise ConfigError(f"{config}: source.kind is not set (the service runs with this config alone)")
    return cfg


def install_service(
    config: str | os.PathLike[str],
    unit_dir: str | os.PathLike[str] = DEFAULT_UNIT_DIR,
    name: str = "pouta-edge",
    user: str | None = DEFAULT_USER,
    dry_run: bool = False,
    enable: bool = False,
    memory_max: str = DEFAULT_MEMORY_MAX,
) -> str:
    """Writes ``<unit_dir>/<name>.service`` (or only returns it with ``dry_run``)."""
    cfg_path = Path(config).resolve()
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: config file not found")
    if not re.match(r"^[A-Za-z0-9:_.@-]+$", name or "") or name.endswith(".service"):
        raise ConfigError(
            f"--name: expected a unit name of letters, digits and :_.@- without '.service', got {name!r}"
        )
    cfg = check_service_config(cfg_path)
    out = Path(cfg["output"]["dir"])
    out = out if out.is_absolute() else cfg_path.parent / out
    ports = [int(cfg["modbus"]["port"])] if cfg["modbus"]["enabled"] else []
    text = unit_text(
        cfg_path,
        name=name,
        user=user,
        output_dir=out,
        memory_max=memory_max,
        low_port=any(0 < p < 1024 for p in ports),
    )
    if dry_run:
        return text
    from .contract.fsutil import atomic_write_text

    target = Path(unit_dir) / f"{name}.service"
    try:
        Path(unit_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
    except OSError as exc:
        raise ConfigError(f"{target}: cannot write the unit ({exc.strerror or exc}); run as root?") from None
    if enable:
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", f"{name}.service"]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ConfigError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.returncode}")
    return str(target)


def reload_thresholds(
    pipe: Pipeline,
    config: str | os.PathLike[str] | None,
    overrides: dict[str, Any] | None = None,
    drift: ScoreDrift | None = None,
    sets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Re-read the config and the model's sidecar; swap in a post-processor with the new
    thresholds. Raises ``PoutaError`` (and changes nothing) when either is invalid."""
    from .config import load_config, make_postprocessor
    from .contract.metadata import load_for_model
    from .drift import calibration_median

    cfg = load_config(config, overrides, sets)
    model = cfg["model"]["path"]
    meta = load_for_model(model)
    if meta.model_id != pipe.model_id:
        raise ConfigError(
            f"{model}: the sidecar now describes model {meta.model_id}, the running model is "
            f"{pipe.model_id}; restart to load a new model"
        )
    post = make_postprocessor(cfg, meta.thresholds)
    pipe.backend.metadata.thresholds = meta.thresholds
    pipe.post = post  # one assignment: a part is judged entirely with the old or the new one
    if drift is not None:
        drift.set_reference(calibration_median(meta.thresholds))
    return {"image_threshold": post.image_threshold, "pixel_threshold": post.pixel_threshold}


def sd_notify(message: str) -> bool:
    """Send ``message`` (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``) to systemd's
    ``$NOTIFY_SOCKET``; False when not run by systemd or the socket is gone. A plain
    datagram socket: no dependency."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode("utf-8"))
    except OSError:
        return False
    return True


class SystemdWatchdog:
    """``WATCHDOG=1`` at a third of ``$WATCHDOG_USEC``, only while ``alive()`` says the
    process makes progress: a hung inference thread stops the pings and systemd restarts us."""

    def __init__(self) -> None:
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        except ValueError:
            usec = 0
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            usec = 0  # meant for another process
        self.interval = usec / 3e6 if usec > 0 else None
        self.limit_s = usec / 1e6 if usec > 0 else None
        self._last = 0.0

    def due_in(self) -> float | None:
        if self.interval is None:
            return None
        return max(0.0, self._last + self.interval - time.monotonic())

    def ping(self, alive: bool) -> None:
        if self.interval is None or not alive:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            sd_notify("WATCHDOG=1")
