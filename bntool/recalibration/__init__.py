"""recalibration."""
