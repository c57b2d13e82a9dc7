"""Sequential, block-by-block calibration: the inputs of block ``i`` come out of blocks ``0..i-1``, already pruned.

1. The calibration batches run through the model once, with every block's ``forward`` replaced by the
   identity; a pre-hook on each block records the arguments it receives (attention masks, position
   embeddings, ...), and the hidden states entering block 0 are kept. The pass stops before whatever
   follows the last block (the final norm and the LM head never run).
2. For each block in turn: pre-hooks on its prunable layers accumulate their input statistics while
   the block runs on the current hidden states (layers reading one tensor share one accumulator, and the
   pass stops once the last layer has seen its input); each layer is pruned (mask attached, weights
   updated for reconstructing methods) and its statistics are freed; then the *pruned* block runs again
   and its outputs replace its inputs, batch by batch, as the next block's inputs. In the true sequential
   mode (``mode="layer"``) the layers are pruned group by group in call order, each group's statistics
   collected on the block whose earlier groups are already pruned.

At any time one set of hidden states (``samples x seq_len x hidden``) and one block's statistics are in
memory, whatever the number of blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .. import masking
from ..modules import fraction_pruned, matches
from .blocks import BlockLayer, is_prunable, block_layers, current_keep, matrix_to_weight, weight_matrix
from .methods import LayerMethod

__all__ = ["BlockInputs", "as_batches", "capture_block_inputs", "run_block", "prune_sequential", "LayerRecord",
           "gather_layers", "outside_layers", "collect_statistics", "call_groups", "SEQUENTIAL_MODES", "BlockSource",
           "RereadableBlockSource", "InMemory", "enter_blocks", "real_tokens"]

#: ``"block"``: every layer of a block calibrated on the dense block; ``"layer"``: true sequential within a block
SEQUENTIAL_MODES = ("block", "layer")


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


class _WrongGuess(Exception):
    """Raised when the blocks' output type was guessed wrong while recording their inputs."""


@dataclass
class BlockInputs:
    """What the blocks receive, per calibration batch."""

    hidden: list[Tensor]  # the hidden states entering the current block, one tensor per batch
    args: list[list[tuple]]  # [block][batch] -> positional arguments after the hidden states
    kwargs: list[list[dict]]  # [block][batch] -> keyword arguments
    token_masks: list[Tensor | None]  # [batch] -> (batch, seq) bool, True = a real token (None: all)
    hidden_as_kwarg: bool = False
    tuple_output: bool = False


def as_batches(calibration: Any, batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Calibration data as a list of keyword-argument batches for the model.

    Accepted: a 2-D integer tensor of token ids ``(samples, seq_len)``; a mapping of tensors with
    ``input_ids`` (e.g. a tokenizer's output, with ``attention_mask``); or an iterable of such mappings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(calibration, Tensor):
        calibration = {"input_ids": calibration}
    if isinstance(calibration, Mapping):
        ids = calibration.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError("calibration must hold 'input_ids' as a 2-D tensor (samples, seq_len)")
        n = ids.shape[0]
        batches = [
            {k: v[i : i + batch_size] if isinstance(v, Tensor) and v.shape[:1] == (n,) else v
             for k, v in calibration.items()}
            for i in range(0, n, batch_size)
        ]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        batches = [dict(b) if isinstance(b, Mapping) else {"input_ids": b} for b in calibration]
    else:
        raise TypeError(
            "calibration must be a tensor of token ids (samples, seq_len), a mapping with input_ids, "
            f"or an iterable of such batches; got {type(calibration).__name__}"
        )
    if not batches:
        raise ValueError("the calibration data is empty")
    for b in batches:
        ids = b.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.numel() == 0:
            raise ValueError("every calibration batch needs non-empty 2-D input_ids (batch, seq_len)")
        if ids.is_floating_point():
            raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
    return batches


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _forward_kwargs(model: nn.Module) -> dict:
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


def _hidden_of(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict, bool]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), False
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest, True
    raise ValueError("cannot find the hidden states among the block's arguments")


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Mapping]) -> BlockInputs:
    """Run the batches up to the blocks and record what each block receives (see the module docstring)."""
    device = next(model.parameters()).device
    extra = _forward_kwargs(model)
    n_blocks = len(blocks)
    first: dict[str, Any] = {}

    def stop_at_first(module, args, kwargs):
        first["value"] = _hidden_of(args, kwargs)
        raise _Stop

    # 1. The first batch up to block 0: its arguments, for the probe below if one is needed.
    handle = blocks[0].register_forward_pre_hook(stop_at_first, with_kwargs=True)
    try:
        model(**{k: _to(v, device) for k, v in batches[0].items()}, **extra)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "value" not in first:
        raise ValueError("the model's forward pass never reached its first block")
    h, a, kw, as_kwarg = first["value"]

    def probe() -> bool:
        """Block 0 run once for real: is its output a tuple?"""
        state["probing"] = True
        try:
            out = blocks[0](*a, hidden_states=h, **kw) if as_kwarg else blocks[0](h, *a, **kw)
        finally:
            state["probing"] = False
        return isinstance(out, tuple)

    # 2. Every batch through identity blocks, recording each block's arguments. Whether a block returns a
    # tensor or a tuple is first guessed (a tensor) and confirmed when block 1 receives the very tensor block 0
    # returned; otherwise (the model indexed it, or there is one block) a probe decides, as it did before.
    inputs = BlockInputs([], [[] for _ in blocks], [[] for _ in blocks], [], as_kwarg, False)
    state: dict[str, Any] = {"tuple": None, "returned": None, "probing": False}
    if n_blocks == 1:
        state["tuple"] = probe()

    def identity(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        state["returned"] = hidden
        return (hidden,) if state["tuple"] else hidden

    def recorder(index: int):
        def hook(module, args, kwargs):
            if state["probing"]:
                return
            hidden, rest_args, rest_kwargs, _ = _hidden_of(args, kwargs)
            if index == 1 and state["tuple"] is None:
                if hidden is not state["returned"]:
                    raise _WrongGuess
                state["tuple"] = False
            inputs.args[index].append(rest_args)
            inputs.kwargs[index].append(rest_kwargs)
            if index == 0:
                inputs.hidden.append(hidden.detach())
            if index == n_blocks - 1:
                raise _Stop

        return hook

    handles = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    for b in blocks:
        b.forward = identity
    try:
        for batch in batches:
            for _ in range(2):
                try:
                    model(**{k: _to(v, device) for k, v in batch.items()}, **extra)
                except _Stop:
                    break
                except Exception:  # _WrongGuess, or what a wrong guess made the model do (first batch only)
                    if state["tuple"] is not None:
                        raise
                    # forget what the first batch recorded, probe, run it again
                    for per_block in (inputs.args, inputs.kwargs):
                        for recorded in per_block:
                            recorded.clear()
                    inputs.hidden.clear()
                    for b in blocks:
                        del b.forward
                    try:
                        state["tuple"] = probe()
                    finally:
                        for b in blocks:
                            b.forward = identity
                    continue
                break
            mask = batch.get("attention_mask")
            inputs.token_masks.append(None if mask is None else mask.to(torch.bool))
    finally:
        for b in blocks:
            if "forward" in b.__dict__:
                del b.forward
        for handle in handles:
            handle.remove()
    inputs.tuple_output = bool(state["tuple"])
    return inputs


def real_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of a layer's input that are real tokens, as ``(tokens, features)``: ``x`` is ``(batch, seq,
    features)``, or ``(batch * seq, features)`` as OPT's MLP sees it; ``mask`` is ``(batch, seq)`` (None: all)."""
    if mask is not None:
        mask = mask.to(x.device)
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask]
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return x[mask.reshape(-1)]
    return x.reshape(-1, x.shape[-1])


def _to(value, device):
    return value.to(device) if isinstance(value, Tensor) else value


def run_block(block: nn.Module, inputs: BlockInputs, index: int, batch: int, hidden: Tensor | None = None) -> Tensor:
    """Block ``index`` on calibration batch ``batch`` (on its current hidden states unless given)."""
    h = inputs.hidden[batch] if hidden is None else hidden
    device = _device(block)
    h = h.to(device)
    args = tuple(_to(a, device) for a in inputs.args[index][batch])
    kwargs = {k: _to(v, device) for k, v in inputs.kwargs[index][batch].items()}
    out = block(*args, hidden_states=h, **kwargs) if inputs.hidden_as_kwarg else block(h, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class LayerRecord:
    """One pruned layer, for the report."""

    name: str
    shape: tuple[int, ...]
    numel: int
    sparsity_before: float
    sparsity_after: float
    seconds: float
    error: float | None = None


@dataclass
class BlockRecord:
    index: int
    seconds: float
    layers: list[LayerRecord] = field(default_factory=list)


class _StatsPass:
    """Pre-hooks that feed each layer's inputs to its accumulator while the block runs.

    Two shortcuts, neither of which changes a statistic: layers that read the very same input tensor
    (q/k/v, gate/up) share one accumulator, filled once; and the pass stops (``_Stop``) as soon as the
    last watched layer has seen its input, so that layer's own matmul and what follows it never run.
    ``order`` lists ``(layer name, owner name)`` in call order (from the first batch), ``owner`` being the
    layer whose accumulator is shared.
    """

    def __init__(self, layers: Sequence[BlockLayer], method: LayerMethod, token_masks: list) -> None:
        self.method, self.token_masks = method, token_masks
        self.stats: dict[str, Any] = {}
        self.owner: dict[str, str] = {}
        self.order: list[tuple[str, str]] = []
        self.batch = 0
        self._seen: set[str] = set()
        self._last: tuple[Tensor, str] | None = None
        self._count = len(layers)
        self.handles = [layer.module.register_forward_pre_hook(self._hook(layer)) for layer in layers]

    def start(self, batch: int) -> None:
        self.batch, self._seen, self._last = batch, set(), None

    def _hook(self, layer: BlockLayer):
        def hook(module, args):
            x = args[0]
            name = layer.name
            if name not in self.owner:  # first batch: own accumulator, or the previous layer's on the same tensor
                shared = self._last is not None and self._last[0] is x
                self.owner[name] = self._last[1] if shared else name
                if not shared:
                    self.stats[name] = self.method.statistics(layer.in_features, _device(module))
                self.stats[name] = self.stats[self.owner[name]]
                self.order.append((name, self.owner[name]))
            if self.owner[name] == name:
                self.stats[name].add(real_tokens(x.detach(), self.token_masks[self.batch]))
                self._last = (args[0], name)
            self._seen.add(name)
            if len(self._seen) == self._count:
                raise _Stop

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def collect_statistics(block: nn.Module, layers: Sequence[BlockLayer], method: LayerMethod, inputs: BlockInputs,
                       index: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Run block ``index`` on every calibration batch and return ``(statistics per layer name, call order)``."""
    watch = _StatsPass(layers, method, inputs.token_masks)
    try:
        for b in range(len(inputs.hidden)):
            watch.start(b)
            try:
                run_block(block, inputs, index, b)
            except _Stop:
                pass
    finally:
        watch.remove()
    return watch.stats, watch.order


def call_groups(order: Sequence[tuple[str, str]], layers: Sequence[BlockLayer]) -> list[list[BlockLayer]]:
    """Layers in call order, those reading one input tensor grouped (q/k/v; o; gate/up; down); layers the
    block never called come last, one group."""
    by_name = {layer.name: layer for layer in layers}
    groups: list[list[BlockLayer]] = []
    owners: list[str] = []
    for name, owner in order:
        if owners and owners[-1] == owner:
            groups[-1].append(by_name[name])
        else:
            groups.append([by_name[name]])
            owners.append(owner)
    seen = {name for name, _ in order}
    rest = [layer for layer in layers if layer.name not in seen]
    return groups + ([rest] if rest else [])


def _attach_stats(layers: Sequence[BlockLayer], method: LayerMethod, token_masks: list, current: list[int]):
    """Forward hooks accumulating every layer's inputs (for full-model passes: layers outside the blocks)."""
    stats, handles = {}, []
    for layer in layers:
        acc = method.statistics(layer.in_features, _device(layer.module))
        stats[layer.name] = acc

        def hook(module, args, output, acc=acc):
            acc.add(real_tokens(args[0].detach(), token_masks[current[0]]))

        handles.append(layer.module.register_forward_hook(hook))
    return stats, handles


def prune_layers(
    model: nn.Module, owner: nn.Module, layers: Sequence[BlockLayer], method: LayerMethod, sparsity: float, pattern,
    stats: dict[str, Any],
) -> list[LayerRecord]:
    """Prune each layer from its statistics (freed as soon as used); masks attached, weights updated if the
    method reconstructs. Consecutive layers sharing one accumulator (q/k/v, gate/up) go to the method's
    ``prune_group`` at once. ``owner`` is a module holding every layer (the block, or the model)."""
    owners = masking.parameter_owners(owner)
    model_owners = owners if owner is model else masking.parameter_owners(model)  # one walk, not two per layer
    groups: list[list[BlockLayer]] = []
    for layer in layers:
        shared = groups and stats.get(layer.name) is not None and stats.get(layer.name) is stats.get(groups[-1][0].name)
        if shared:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    records = []
    for group in groups:
        start = time.perf_counter()
        found = [model_owners[id(masking.raw_parameter(layer.module, "weight"))] for layer in group]
        befores = [fraction_pruned(masking.get_mask(model, layer.weight_name, o)) for layer, o in zip(group, found)]
        acc = None
        for layer in group:
            acc = stats.pop(layer.name, None)
        weights = [weight_matrix(layer) for layer in group]
        kepts = [current_keep(model, layer, o) for layer, o in zip(group, found)]
        if len(group) > 1:
            results = method.prune_group(weights, acc, sparsity, pattern, kepts)
        else:
            results = [method.prune(weights[0], acc, sparsity, pattern, kepts[0])]
        del acc, weights, kepts
        seconds = (time.perf_counter() - start) / len(group)
        for layer, result, before in zip(group, results, befores):
            param = masking.raw_parameter(layer.module, "weight")
            if result.weight is not None:
                with torch.no_grad():
                    param.copy_(matrix_to_weight(layer, result.weight).to(param.dtype))
            keep = matrix_to_weight(layer, result.keep).contiguous()
            after = masking.attach(model, layer.weight_name, keep, copy=False, owners=owners[id(param)])
            records.append(LayerRecord(layer.name, tuple(param.shape), param.numel(), before, fraction_pruned(after),
                                       seconds, result.error))
    return records


def prune_block(
    model: nn.Module,
    block: nn.Module,
    layers: Sequence[BlockLayer],
    method: LayerMethod,
    sparsity: float,
    pattern,
    inputs: BlockInputs | None,
    index: int,
    mode: str = "block",
) -> list[LayerRecord]:
    """Collect the block's layer statistics on ``inputs``, then prune its layers.

    ``mode="block"``: one statistics pass on the dense block, then every layer is pruned. ``mode="layer"``
    (true sequential): the layers are pruned group by group in call order (q/k/v, o, gate/up, down), each
    group's statistics collected with the groups before it already pruned.
    """
    if not method.needs_data:
        return prune_layers(model, block, layers, method, sparsity, pattern, {})
    if mode == "block":
        stats, _ = collect_statistics(block, layers, method, inputs, index)
        return prune_layers(model, block, layers, method, sparsity, pattern, stats)
    # The call order from one batch (the pass stops at the last layer), then one pass per group.
    probe = BlockInputs(inputs.hidden[:1], inputs.args, inputs.kwargs, inputs.token_masks[:1],
                        inputs.hidden_as_kwarg, inputs.tuple_output)
    _, order = collect_statistics(block, layers, _NoStats(), probe, index)
    records = []
    for group in call_groups(order, layers):
        stats, _ = collect_statistics(block, group, method, inputs, index)
        records += prune_layers(model, block, group, method, sparsity, pattern, stats)
    return records


class _NoStats(LayerMethod):
    """A method that only lets the statistics pass record the call order."""

    def statistics(self, in_features, device):
        return _Ignore()


class _Ignore:
    def add(self, x: Tensor) -> None:
        pass


def prune_outside(
    model: nn.Module, layers: Sequence[BlockLayer], method: LayerMethod, sparsity: float, pattern,
    batches: Sequence[Mapping] | None,
) -> list[LayerRecord]:
    """Prune layers outside the blocks (e.g. the LM head), after the blocks: their statistics come from full
    forward passes of the model, whose blocks are already pruned."""
    stats: dict[str, Any] = {}
    if method.needs_data:
        token_masks = [None if b.get("attention_mask") is None else b["attention_mask"].to(torch.bool) for b in batches]
        current = [0]
        stats, handles = _attach_stats(layers, method, token_masks, current)
        device = next(model.parameters()).device
        try:
            for i, batch in enumerate(batches):
                current[0] = i
                model(**{k: _to(v, device) for k, v in batch.items()}, **_forward_kwargs(model))
        finally:
            for handle in handles:
                handle.remove()
    return prune_layers(model, model, layers, method, sparsity, pattern, stats)


class BlockSource(Protocol):
    """Where the blocks' weights come from when they are not all in memory (see :mod:`prunekit.llm.streaming`):
    :func:`prune_sequential` calls ``load(i)`` before block ``i`` is used (``load(0)`` also before the
    calibration batches first run up to the blocks), ``captured()`` once they have (what runs before the
    blocks is no longer needed) and ``release(i)`` once block ``i`` is pruned and its outputs computed."""

    def load(self, index: int) -> None: ...

    def captured(self) -> None: ...

    def release(self, index: int) -> None: ...


@runtime_checkable
class RereadableBlockSource(BlockSource, Protocol):
    """A :class:`BlockSource` that can also serve a pass over the *dense* blocks before the pruning pass (the
    scoring pass of OWL and sensitivity allocation, :func:`prunekit.llm.allocation.block_scores`).

    ``read_only()`` returns another source, called the same way (``load(i)``, ``captured()``, ``release(i)``),
    whose ``release(i)`` frees block ``i`` and writes or keeps nothing: the blocks are then loaded a second
    time, dense again, by the pruning pass. A separate object rather than a flag, so that the pruning source
    can never be left in a read-only state, nor the read-only one write by mistake."""

    def read_only(self) -> BlockSource: ...


class InMemory:
    """The :class:`BlockSource` of a model whose weights are all in memory: nothing to load or free."""

    def load(self, index: int) -> None:
        pass

    def captured(self) -> None:
        pass

    def release(self, index: int) -> None:
        pass


def enter_blocks(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Mapping] | None,
                 source: BlockSource) -> BlockInputs | None:
    """The start of a pass over the blocks: ``source.load(0)``, the calibration batches (if any) run up to the
    blocks (:func:`capture_block_inputs`), then ``source.captured()``. The pass then calls ``source.load(i)``
    before each later block ``i`` and ``source.release(i)`` once block ``i`` is done."""
    source.load(0)
    inputs = None if batches is None else capture_block_inputs(model, blocks, batches)
    source.captured()
    return inputs


def prune_sequential(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    layers: Sequence[Sequence[BlockLayer]],
    method: LayerMethod,
    sparsity: float | Sequence[float],
    pattern,
    batches: Sequence[Mapping] | None,
    progress: Callable[[int, int, float], None] | None = None,
    outside: Sequence[BlockLayer] = (),
    mode: str = "block",
    source: BlockSource | None = None,
) -> list[BlockRecord]:
    """Prune every block in order; ``layers[i]`` are block ``i``'s targets (already validated), pruned to
    ``sparsity`` (one number, or one per block). Layers in ``outside`` (not in any block) are pruned last, at
    the mean sparsity, as one more step of the progress. ``mode``: see :func:`prune_block`. ``source``
    loads and releases the blocks' weights (see :class:`BlockSource`)."""
    per_block = [float(sparsity)] * len(blocks) if isinstance(sparsity, (int, float)) else [float(s) for s in sparsity]
    source = InMemory() if source is None else source
    inputs = enter_blocks(model, blocks, batches if method.needs_data else None, source)
    steps = len(blocks) + (1 if outside else 0)
    records = []
    for i, block in enumerate(blocks):
        start = time.perf_counter()
        if i:
            source.load(i)
        layer_records = (prune_block(model, block, layers[i], method, per_block[i], pattern, inputs, i, mode)
                         if layers[i] else [])
        if inputs is not None and i < len(blocks) - 1:
            for b in range(len(inputs.hidden)):
                inputs.hidden[b] = run_block(block, inputs, i, b).detach()
        source.release(i)
        seconds = time.perf_counter() - start
        records.append(BlockRecord(i, seconds, layer_records))
        if progress is not None:
            progress(i, steps, seconds)
    if outside:
        del inputs
        start = time.perf_counter()
        mean = sum(per_block) / len(per_block)
        layer_records = prune_outside(model, outside, method, mean, pattern, batches)
        seconds = time.perf_counter() - start
        records.append(BlockRecord(len(blocks), seconds, layer_records))
        if progress is not None:
            progress(len(blocks), steps, seconds)
    return records


def outside_layers(model: nn.Module, blocks_name: str, include: Iterable[str]) -> list[BlockLayer]:
    """Linear / Conv1D layers outside the blocks named by ``include`` (names or globs); each pattern must
    match one, and a weight tied to another parameter (e.g. an LM head tied to the embeddings) is refused."""
    include = [include] if isinstance(include, str) else list(include)
    if not include:
        return []
    owners = masking.parameter_owners(model)
    found: dict[str, BlockLayer] = {}
    for pattern in include:
        hit = False
        for name, module in model.named_modules():
            if not name or name == blocks_name or name.startswith(blocks_name + "."):
                continue
            if not matches(name, pattern):
                continue
            if not is_prunable(module):
                raise ValueError(f"include={pattern!r}: {name} is a {type(module).__name__}, not a Linear or Conv1D")
            tied = owners[id(masking.raw_parameter(module, "weight"))]
            if len(tied) > 1:
                others = ", ".join(o.qualified_name for o in tied if o.module is not module)
                raise ValueError(f"{name}.weight is tied to {others}; pruning it would prune that too (untie it first)")
            found[name] = BlockLayer(name, name, module)
            hit = True
        if not hit:
            raise ValueError(f"include pattern {pattern!r} matches no Linear layer outside the blocks ({blocks_name})")
    return list(found.values())


def gather_layers(
    blocks_name: str, blocks: nn.ModuleList, exclude: Iterable[str] = ()
) -> list[list[BlockLayer]]:
    """Every block's prunable layers minus ``exclude``; every exclude pattern must match something."""
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    used: set[str] = set()
    found = [block_layers(b, f"{blocks_name}.{i}", exclude, used) for i, b in enumerate(blocks)]
    unused = [p for p in exclude if p not in used]
    if unused:
        raise ValueError(f"exclude pattern {unused[0]!r} matches no layer inside the blocks ({blocks_name}.*)")
    return found
