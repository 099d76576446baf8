"""Calibration: text sources, deterministic sampling, and the observers that collect statistics.

Installed as moeexport.calibration.
"""

from moeexport.calibration.observers import LayerStatistics, Statistics, observe
from moeexport.calibration.sources import CalibrationConfig, calibration_tokens

__all__ = ["CalibrationConfig", "LayerStatistics", "Statistics", "calibration_tokens", "observe"]
