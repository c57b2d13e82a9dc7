"""Pruning a Hugging Face model bigger than memory: its blocks streamed from the safetensors shards on disk.

    report = pk.llm.prune_from_disk("llama-7b", "llama-7b-50", calib, method="sparsegpt", sparsity=0.5)

:func:`prune_from_disk` builds the model from ``config.json`` with every parameter on the ``meta`` device
(no memory), then runs :func:`prunekit.llm.prune` on it with a :class:`~prunekit.llm.sequential.BlockSource`
that, block by block, loads the block's tensors from the shards (only those), lets the block be
calibrated and pruned and its outputs computed, writes its pruned tensors to the output shards and frees
them. OWL and sensitivity allocation first score the dense blocks in a pass of their own, through the
source's read-only view: each block loaded, run, freed, nothing written. What runs before the blocks (the embeddings) is loaded for block 0's inputs and freed after; the
LM head never is. The tensors outside the blocks are copied into the output one at a time at the end.
Resident memory is therefore about one block (plus the method's statistics for one layer group) plus the
calibration activations, whatever the model's size; ``benchmarks/llm_streaming.py`` measures it.

The result is the same, bit for bit, as loading the model with ``from_pretrained``, pruning it with
:func:`prunekit.llm.prune` and saving it: the same routine prunes each block on the same inputs. The output
folder holds the shards (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, or one
``model.safetensors``), the input folder's other files (``config.json``, tokenizer files, ...) and
``prune_report.json``; it is built next to its destination and put in place only when complete, so a
failed or interrupted call leaves every file as it was.

:func:`needs_low_memory` tells whether a model folder's weights take more than half of the available
memory (``prunekit llm`` then streams by itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..outputs import RunOutput
from ..masking import finalize
from .api import LLMPruneReport, prune
from .blocks import find_blocks
from .hf import check_model_dir, model_class, offline
from .shards import DTYPES, INDEX, Checkpoint, ShardWriter, parse_size

__all__ = ["prune_from_disk", "needs_low_memory", "available_memory", "REPORT_FILE"]

#: the report written into the output folder (one of prunekit.outputs.OUTPUT_FILES)
REPORT_FILE = "prune_report.json"
#: weight files of any format: never copied from the input folder
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def available_memory() -> int | None:
    """Bytes of memory available to a new process (``psutil``, else ``/proc/meminfo``); None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def needs_low_memory(model_dir: str | os.PathLike, fraction: float = 0.5) -> bool:
    """Whether the model's safetensors weights take more than ``fraction`` of the available memory (pruning
    in memory needs the model plus working memory); False when the memory or the weights are unknown."""
    available = available_memory()
    if available is None:
        return False
    try:
        size = Checkpoint(model_dir).nbytes
    except (OSError, ValueError):
        return False
    return size > fraction * available


def _output(model_dir: Path, out_dir: str | os.PathLike) -> RunOutput:
    """The output folder, checked (not the model folder, not inside it, nor holding it; new, empty or an
    earlier prunekit output); its lock is taken when the first block is written."""
    out = Path(out_dir).expanduser()
    if out.resolve().is_relative_to(model_dir.resolve()):
        raise ValueError(f"out_dir {out} is or lies inside the model folder {model_dir}; choose a separate folder")
    return RunOutput(out, "out_dir", keep=[model_dir])


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered in the block moves to the meta device as it is registered (so at most one
    is ever allocated); buffers (rotary tables, ...) are computed as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model with its parameters on the meta device and its buffers (rotary tables, ...) computed."""
    with _parameters_on_meta():
        model = model_class(config).from_config(config, dtype=dtype)
    model.tie_weights()  # on the meta device the tying is not done by itself (transformers 5)
    _trim_heap()  # each parameter was allocated for a moment before going to the meta device
    return model.eval()


def _key_map(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """Checkpoint key -> the model's name for it (the same, or with the base model's prefix added)."""
    names = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for key in checkpoint.tensors:
        if key in names:
            out[key] = key
        elif prefix and f"{prefix}.{key}" in names:
            out[key] = f"{prefix}.{key}"
        elif prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in names:  # a base model
            out[key] = key[len(prefix) + 1 :]
    return out


def _set(model: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` in place of parameter or buffer ``name`` (a meta tensor frees it)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _free(model: nn.Module, name: str) -> None:
    value = model.get_parameter(name) if _is_parameter(model, name) else model.get_buffer(name)
    _set(model, name, torch.empty(value.shape, dtype=value.dtype, device="meta"))


def _trim_heap() -> None:
    """Hand the heap memory freed with a block back to the OS (glibc ``malloc_trim``; elsewhere a no-op):
    otherwise the allocator keeps it, fragmented, and resident memory creeps up block after block."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _is_parameter(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr in model.get_submodule(module_name)._parameters


class _DiskReads:
    """A read-only :class:`~prunekit.llm.sequential.BlockSource`: loads each block from the checkpoint and frees
    it after, writing nothing (the dense scoring pass of OWL / sensitivity allocation). What runs before the
    blocks (``front``) is loaded with block 0 and freed once block 0's inputs are captured."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, checkpoint: Checkpoint, key_map: dict[str, str],
                 block_keys: list[list[str]], front: list[str]) -> None:
        self.model, self.blocks, self.checkpoint, self.key_map = model, blocks, checkpoint, key_map
        self.block_keys, self.front = block_keys, front

    def _load(self, keys: Sequence[str]) -> None:
        for key, value in self.checkpoint.read([k for k in keys if k in self.key_map]).items():
            _set(self.model, self.key_map[key], value)

    def load(self, index: int) -> None:
        if index == 0:
            self._load(self.front)
        self._load(self.block_keys[index])

    def captured(self) -> None:
        for key in self.front:  # the embeddings: block 0's inputs are computed
            _free(self.model, self.key_map[key])
        _trim_heap()

    def release(self, index: int) -> None:
        for key in self.block_keys[index]:
            _free(self.model, self.key_map[key])
        _trim_heap()


class _DiskBlocks(_DiskReads):
    """The :class:`~prunekit.llm.sequential.RereadableBlockSource` of :func:`prune_from_disk`: loads each block
    from the checkpoint, writes it (pruned) to the output shards and frees it; opens the output when the first
    block is loaded for pruning (after :func:`prunekit.llm.prune` has checked its arguments and any dense
    scoring pass, through :meth:`read_only`, has run) and writes the rest in :meth:`finish`."""

    def __init__(self, model: nn.Module, blocks_name: str, blocks: nn.ModuleList, checkpoint: Checkpoint,
                 key_map: dict[str, str], out: RunOutput, max_shard_size: int, stack: contextlib.ExitStack) -> None:
        num_blocks = len(blocks)
        block_keys: list[list[str]] = [[] for _ in range(num_blocks)]
        self.other_keys: list[str] = []
        for key in checkpoint.tensors:
            name = key_map.get(key, "")
            index = name[len(blocks_name) + 1 :].split(".", 1)[0] if name.startswith(blocks_name + ".") else ""
            if index.isdigit() and int(index) < num_blocks:
                block_keys[int(index)].append(key)
            else:
                self.other_keys.append(key)
        output = set(_output_embedding_names(model))
        # what runs before the blocks: every parameter outside them except an untied LM head
        front = [k for k in self.other_keys if k in key_map and _is_parameter(model, key_map[k])
                 and key_map[k] not in output]
        super().__init__(model, blocks, checkpoint, key_map, block_keys, front)
        self.out, self.max_shard_size, self.stack = out, max_shard_size, stack
        self.tmp: Path | None = None
        self.writer: ShardWriter | None = None

    def read_only(self) -> _DiskReads:
        """A source over the same checkpoint that loads and frees the dense blocks, and never opens the output."""
        return _DiskReads(self.model, self.blocks, self.checkpoint, self.key_map, self.block_keys, self.front)

    def _open(self) -> None:
        self.stack.enter_context(self.out)  # the folder's lock
        self.tmp = self.stack.enter_context(self.out.replacing())
        plan = [(k, self.checkpoint.tensors[k]) for keys in self.block_keys for k in keys]
        plan += [(k, self.checkpoint.tensors[k]) for k in self.other_keys]
        self.writer = ShardWriter(self.tmp, plan, self.max_shard_size)
        self.stack.callback(self.writer.abort)

    def load(self, index: int) -> None:
        if self.writer is None:
            self._open()
        super().load(index)

    def release(self, index: int) -> None:
        finalize(self.blocks[index])  # masks baked into the weights: pruned entries are stored zeros
        for key in self.block_keys[index]:
            name = self.key_map[key]
            self.writer.write(key, self.model.get_parameter(name) if _is_parameter(self.model, name)
                              else self.model.get_buffer(name))
            _free(self.model, name)
        _trim_heap()

    def finish(self, report: LLMPruneReport, source: Path, metadata: dict[str, Any]) -> None:
        """Copy the tensors outside the blocks (one at a time), the index, the input folder's other files
        and the report into the output folder (put in place when the caller's stack closes)."""
        if self.writer is None:  # no block at all was loaded (cannot happen with a model that has blocks)
            self._open()
        for key in self.other_keys:
            value = self.checkpoint.read([key])[key]
            self.writer.write(key, value)
            del value
        self.writer.close()
        for path in sorted(source.iterdir()):
            if path.is_file() and not path.name.startswith(".") and not path.name.endswith(_WEIGHT_SUFFIXES) \
                    and path.name not in (INDEX, REPORT_FILE):
                shutil.copy2(path, self.tmp / path.name)
        info = {"model": str(source), "low_memory": True, "shards": self.writer.files, **metadata,
                "prune": report.to_dict()}
        (self.tmp / REPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _output_embedding_names(model: nn.Module) -> list[str]:
    """The names of the LM head's parameters (none when they are tied to the input embeddings)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return []
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(p) for p in inputs.parameters()} if inputs is not None else set()
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names.get(id(head))
    if prefix is None:
        return []
    return [f"{prefix}.{n}" for n, p in head.named_parameters() if id(p) not in tied]


def prune_from_disk(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    calibration: Any = None,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: str | None = None,
    *,
    exclude: Iterable[str] | str = (),
    blocks: str | None = None,
    batch_size: int = 8,
    progress: bool | Callable[[int, int, float], None] = False,
    sequential: str = "block",
    allocation: str | Sequence[float] = "uniform",
    recovery: str | None = None,
    recovery_steps: int = 10,
    max_shard_size: int | str = "2GB",
    metadata: Mapping[str, Any] | None = None,
    **options: Any,
) -> LLMPruneReport:
    """Prune a local Hugging Face model folder block by block, reading and writing one block at a time, so
    that a model bigger than memory can be pruned (see the module docstring).

    Args:
        model_dir: a model folder with ``config.json`` and safetensors weights (one file, or shards with
            ``model.safetensors.index.json``).
        out_dir: the output folder (not ``model_dir``, nor inside it); a folder holding other files than an
            earlier prunekit output is refused. ``from_pretrained(out_dir)`` loads the pruned model.
        calibration, method, sparsity, pattern, exclude, blocks, batch_size, progress, sequential,
        recovery, recovery_steps, **options: as in :func:`prunekit.llm.prune`.
        allocation: ``"uniform"``, ``"owl"``, ``"sensitivity"`` or one sparsity per block, as in
            :func:`prunekit.llm.prune` (with its ``allocation_range`` and ``outlier_threshold``). OWL and
            sensitivity score every dense block before the first is pruned: that pass reads the blocks from
            disk one at a time too (and writes nothing), so the blocks are read twice. ``include=`` (the LM
            head) needs the whole model and does not stream: use :func:`prunekit.llm.prune`.
        max_shard_size: the largest output shard, in bytes or as ``"2GB"``, ``"500MB"``.
        metadata: more entries for ``prune_report.json`` (e.g. how the calibration data was drawn).

    Returns the report of :func:`prunekit.llm.prune`; it is also written to ``out_dir/prune_report.json``.
    Bad arguments raise before any file is created; a failure later leaves ``out_dir`` as it was.
    """
    offline()
    model_dir = check_model_dir(model_dir)
    out = _output(model_dir, out_dir)
    shard_bytes = parse_size(max_shard_size)
    if options.get("include"):
        raise ValueError(f"include={options['include']!r} prunes layers outside the blocks with passes of the whole "
                         "model, which prune_from_disk does not stream; use pk.llm.prune")
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    if getattr(config, "prunekit_attention", None) is not None:
        raise ValueError(f"{model_dir} has attention heads removed by prunekit (config.prunekit_attention); "
                         "prune_from_disk builds the model from config.json alone and cannot stream it")
    checkpoint = Checkpoint(model_dir)
    floats = [DTYPES[t.dtype] for t in checkpoint.tensors.values() if DTYPES[t.dtype].is_floating_point]
    dtype = getattr(config, "dtype", None) or (floats[0] if floats else torch.float32)  # as from_pretrained
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = _skeleton(config, dtype)
    key_map = _key_map(model, checkpoint)
    mapped = set(key_map.values())
    tied_head = set(n for n, _ in model.named_parameters(remove_duplicate=False)) - set(dict(model.named_parameters()))
    missing = [n for n, _ in model.named_parameters() if n not in mapped and n not in tied_head]
    if missing:
        raise ValueError(f"{model_dir}: the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[0]}")
    blocks_name, block_list = find_blocks(model, blocks)

    with contextlib.ExitStack() as stack:
        source = _DiskBlocks(model, blocks_name, block_list, checkpoint, key_map, out, shard_bytes, stack)
        report = prune(model, calibration, method, sparsity, pattern, exclude=exclude, blocks=blocks_name,
                       batch_size=batch_size, progress=progress, sequential=sequential, allocation=allocation,
                       recovery=recovery, recovery_steps=recovery_steps, block_source=source, **options)
        source.finish(report, model_dir, dict(metadata or {}))
    return report
