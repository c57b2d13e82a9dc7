"""Structured pruning: the dependency graph, physical removal of channels, filters, neurons, heads and
residual blocks, group criteria, and channel masks that agree with surgery.

    import prunekit as pk
    graph = pk.structured.DependencyGraph(model, example_inputs)
    graph.groups()                                             # what must shrink together
    pk.structured.prune(model, example_inputs, ratio=0.5, method="l1", scope="local")
"""

from ._types import UnsupportedOperationError
from .api import (
    GroupReport,
    StructuredOptions,
    StructuredReport,
    prune,
    remove,
    remove_dead,
    select_channels,
    vector_round_to,
)
from .blocks import RemovedBlock, block_scores, remove_blocks, residual_blocks
from .criteria import GROUP_CRITERIA, GroupCriterion, get_group_criterion
from .graph import Boundary, DependencyGraph, Group, Member
from .hf_io import load_pretrained
from .mha import PrunedMultiheadAttention
from .rules import ModuleRule, register_rule
from .spec import StructuredSpec
from .surgery import channel_masks, remove_channels

__all__ = [
    "DependencyGraph",
    "Group",
    "Member",
    "Boundary",
    "UnsupportedOperationError",
    "register_rule",
    "ModuleRule",
    "remove_channels",
    "channel_masks",
    "PrunedMultiheadAttention",
    "load_pretrained",
    "vector_round_to",
    "StructuredOptions",
    "prune",
    "remove",
    "remove_dead",
    "select_channels",
    "StructuredReport",
    "GroupReport",
    "GROUP_CRITERIA",
    "GroupCriterion",
    "get_group_criterion",
    "StructuredSpec",
    "remove_blocks",
    "residual_blocks",
    "block_scores",
    "RemovedBlock",
]
