"""pouta.calibration."""
