"""Recording what the blocks receive: the blocks' output type is guessed, confirmed or probed, never wrong.

``capture_block_inputs`` runs the calibration batches through identity blocks. It guesses that a block returns
a tensor and confirms it when block 1 receives the very tensor block 0 returned; a model that indexes the
output (a tuple-returning block) or has one block gets a real run of block 0 instead. Either way the recorded
hidden states and arguments are those the real blocks see.
"""

import pytest
import torch

import prunekit as pk
from prunekit.llm.blocks import find_blocks
from prunekit.llm.models import tiny_model
from prunekit.llm.sequential import as_batches, capture_block_inputs, run_block


@pytest.mark.parametrize("arch,layers", [("llama", 2), ("llama", 1), ("gpt2", 2), ("opt", 3), ("bert", 2)])
def test_recorded_inputs_are_what_the_real_blocks_receive(arch, layers):
    model = tiny_model(arch, seed=0, num_hidden_layers=layers)
    _, blocks = find_blocks(model)
    batches = as_batches(pk.llm.random_calibration(256, 4, 12, seed=1), batch_size=2)
    seen, real_types = [], []
    handles = [b.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                           with_kwargs=True) for b in blocks[:1]]
    handles += [blocks[0].register_forward_hook(lambda m, a, o: real_types.append(isinstance(o, tuple)))]
    with torch.no_grad():
        for batch in batches:  # the real model: what block 0 receives and what it returns
            model(**batch)
        for handle in handles:
            handle.remove()
        inputs = capture_block_inputs(model, blocks, batches)
        assert inputs.tuple_output == real_types[0]
        assert len(inputs.hidden) == len(batches) and all(len(a) == len(batches) for a in inputs.args)
        for got, want in zip(inputs.hidden, seen):
            assert torch.equal(got, want)
        # block 1 run on block 0's real output from the recorded arguments gives what the model computes
        if layers > 1:
            out = [run_block(blocks[0], inputs, 0, b) for b in range(len(batches))]
            want = []
            hook = blocks[1].register_forward_pre_hook(
                lambda m, a, k: want.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
            for batch in batches:
                model(**batch)
            hook.remove()
            for o, w in zip(out, want):
                assert torch.equal(o, w)


class _TupleBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, hidden, scale):
        return (torch.tanh(self.fc(hidden)) * scale,)


class _TupleModel(torch.nn.Module):
    """Blocks returning tuples, indexed by the model's loop (as older Hugging Face models do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList(_TupleBlock() for _ in range(3))

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, scale=2.0)[0]
        return hidden


def test_blocks_returning_tuples_are_probed_and_recorded_as_the_real_ones():
    model = _TupleModel()
    ids = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(2))
    batches = as_batches(ids, batch_size=2)
    with torch.no_grad():
        inputs = capture_block_inputs(model, model.layers, batches)
        assert inputs.tuple_output is True
        assert len(inputs.hidden) == 2 and all(len(a) == 2 and len(k) == 2 for a, k in zip(inputs.args, inputs.kwargs))
        for b, batch in enumerate(batches):
            assert torch.equal(inputs.hidden[b], model.embed(batch["input_ids"]))
            assert inputs.kwargs[1][b] == {"scale": 2.0}
        # the pruning pipeline runs on it and prunes every block's Linear
        report = pk.llm.prune(model, ids, method="wanda", sparsity=0.5, batch_size=2)
    assert len(report.block_seconds) == 3 and pk.sparsity(model) > 0
