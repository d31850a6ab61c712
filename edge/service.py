"""Running as a service: the systemd unit (``pouta-edge install-service``) and the hot
reload of thresholds (SIGHUP, ``systemctl reload``, or ``POST /api/reload``).

The unit runs ``pouta-edge run --config FILE`` with that file alone (so the file must
name the model and the source), restarts it on failure but not after a config error
(exit 2: restarting cannot fix a typo), logs to journald and reloads with SIGHUP.

A reload re-reads the config file and the model's metadata sidecar and swaps the
post-processor in one assignment: the inference thread picks up either the old or the
new thresholds for a part, never a mix, and no part waits or is dropped.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .drift import ScoreDrift
    from .pipeline import Pipeline

DEFAULT_UNIT_DIR = "/etc/systemd/system"
EXIT_CONFIG = 2

UNIT_TEMPLATE = """\
[Unit]
Description=pouta-edge line-side inspection ({config_name})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
{user_line}WorkingDirectory={workdir}
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
# Exit 2 is a config/model error: restarting cannot fix it.
RestartPreventExitStatus={exit_config}
KillSignal=SIGTERM
TimeoutStopSec=60
Environment=PYTHONUNBUFFERED=1
StandardOutput=journal
StandardError=journal
SyslogIdentifier={name}

[Install]
WantedBy=multi-user.target
"""


def unit_text(
    config: Path, name: str = "pouta-edge", user: str | None = None, python: str | None = None
) -> str:
    """The unit for ``config`` (an absolute path); relative paths inside the config are
    resolved from the config's folder (the unit's working directory)."""
    exe = python or sys.executable
    cmd = [exe, "-m", "pouta.edge.cli", "run", "--config", str(config), "--quiet"]
    return UNIT_TEMPLATE.format(
        config_name=config.name,
        user_line=f"User={user}\n" if user else "",
        workdir=str(config.parent),
        exec_start=shlex.join(cmd),
        exit_config=EXIT_CONFIG,
        name=name,
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
    user: str | None = None,
    dry_run: bool = False,
    enable: bool = False,
) -> str:
    """Writes ``<unit_dir>/<name>.service`` (or only returns it with ``dry_run``)."""
    cfg_path = Path(config).resolve()
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: config file not found")
    if not name or "/" in name or name.endswith(".service"):
        raise ConfigError(f"--name: expected a unit name without '/' or '.service', got {name!r}")
    check_service_config(cfg_path)
    text = unit_text(cfg_path, name=name, user=user)
    if dry_run:
        return text
    from .fsutil import atomic_write_text

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
    from .drift import calibration_median
    from .metadata import load_for_model

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
