"""Pruning before and during training.

* ``rewinding``: ``capture`` a ``Checkpoint``, ``rewind`` weights (Frankle et al. 2019) or the learning
  rate (Renda et al. 2020);
* ``lottery``: ``LotteryTicket`` (iterative magnitude pruning with rewinding) and ``reinitialize`` (the
  random re-initialisation control);
* ``dst``: dynamic sparse training at constant sparsity, ``SET`` (Mocanu et al.), ``SETCosine`` and ``RigL``;
* ``utils``: ``rescale_dropout`` (Han et al. 2015), ``freeze`` / ``unfreeze``;
* ``callbacks``: ``lightning_callback`` and ``hf_callback`` drive a ``Pruner`` (or SET/RigL) from
  PyTorch Lightning's or Hugging Face's ``Trainer`` (both imported only when used).
"""

from .callbacks import hf_callback, lightning_callback
from .dst import SET, DynamicSparseTraining, RigL, SETCosine, cosine_update_fraction
from .lottery import LotteryRound, LotteryTicket, reinitialize
from .rewinding import (
    Checkpoint,
    capture,
    replay_schedule,
    rewind,
    rewind_learning_rate,
    rewind_weights,
)
from .utils import freeze, rescale_dropout, unfreeze

__all__ = [
    "Checkpoint",
    "capture",
    "rewind",
    "rewind_weights",
    "rewind_learning_rate",
    "replay_schedule",
    "LotteryTicket",
    "LotteryRound",
    "reinitialize",
    "DynamicSparseTraining",
    "SET",
    "SETCosine",
    "RigL",
    "cosine_update_fraction",
    "rescale_dropout",
    "freeze",
    "unfreeze",
    "lightning_callback",
    "hf_callback",
]
