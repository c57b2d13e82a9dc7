"""Scoring criteria, one file per family. Importing this package registers them all."""

from . import magnitude, gradient, init_time, obs, threshold  # noqa: F401, I001  (registration order = listing order)
from .base import CRITERIA, Criterion, get_criterion
from .obs import OBS
from .threshold import HanThreshold, Threshold

__all__ = ["CRITERIA", "Criterion", "get_criterion", "OBS", "HanThreshold", "Threshold"]
