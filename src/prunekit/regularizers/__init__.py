"""Penalties and learned sparsity: ``pk.regularizers``.

* ``penalties``: ``L1``, ``L2``, ``ElasticNet``, ``GroupLasso``, ``SparseGroupLasso`` (a term for the loss,
  an optional proximal step, pruning by threshold); ``get_penalty(name, model, ...)``;
* ``l0``: ``L0`` hard-concrete gates on weights, neurons or channels (Louizos et al. 2018);
* ``variational``: ``SparseVD``, sparse variational dropout (Molchanov et al. 2017);
* ``learned``: ``LearnedMasks``, trainable scores with a straight-through estimator (Sanh et al. 2020);
* ``dns``: ``DynamicNetworkSurgery``, pruning and splicing with two thresholds (Guo et al. 2016);
* ``targeted_dropout``: ``TargetedDropout``, dropout on the weights pruning will remove (Gomez et al. 2019).

Every wrapper ends with ``to_masks()``: a plain prunekit-masked model, ready for ``pk.finalize`` or
``pk.save``.
"""

from .dns import DynamicNetworkSurgery
from .l0 import L0, HardConcrete
from .learned import LearnedMasks
from .penalties import (
    L1,
    L2,
    PENALTIES,
    ElasticNet,
    GroupLasso,
    Penalty,
    SparseGroupLasso,
    get_penalty,
    soft_threshold,
)
from .targeted_dropout import TargetedDropout
from .variational import SparseVD, kl_approximation

__all__ = [
    "Penalty",
    "L1",
    "L2",
    "ElasticNet",
    "GroupLasso",
    "SparseGroupLasso",
    "PENALTIES",
    "get_penalty",
    "soft_threshold",
    "L0",
    "HardConcrete",
    "SparseVD",
    "kl_approximation",
    "LearnedMasks",
    "DynamicNetworkSurgery",
    "TargetedDropout",
]
