"""Committee uncertainty: frame scores, calibration against true errors, trust levels."""
from .scores import (Calibration, calibrate, calibrate_file, fit_calibration, force_mae, frame_scores,
                     plot_calibration, spearman)
from .triggers import CANDIDATE, LOST, TRUSTED, RingBuffer, Trigger, TrustLevels, farthest_points, frame_distance

__all__ = ["Calibration", "calibrate", "calibrate_file", "fit_calibration", "force_mae", "frame_scores",
           "plot_calibration", "spearman",
           "CANDIDATE", "LOST", "TRUSTED", "RingBuffer", "Trigger", "TrustLevels", "farthest_points", "frame_distance"]
