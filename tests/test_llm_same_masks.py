"""The faster SparseGPT / Wanda pipeline gives the masks and weights of the straightforward one.

The reference here is the previous implementation, kept small: one accumulator per layer filled by a
forward hook during a full pass of the block, the Hessian as one full product, and the reference
``fasterprune`` column sweep. The fast path shares accumulators between layers reading one tensor,
stops the pass at the last layer's input, accumulates only the Hessian's lower triangle and trims the
sweep; none of that may change a single mask bit or weight.
"""

import math

import pytest
import torch

import prunekit as pk
from prunekit import masking
from prunekit.llm.blocks import block_layers, find_blocks, matrix_to_weight, weight_matrix
from prunekit.llm.models import tiny_model
from prunekit.granularity import NM
from prunekit.llm.sparsegpt import Hessian, _inverse_cholesky, sparsegpt, sparsegpt_group
from prunekit.llm.wanda import InputNorms, wanda_mask


def _old_hessian(xs):
    H, tokens = None, 0
    for x in xs:
        x = x.reshape(-1, x.shape[-1]).float()
        H = torch.zeros(x.shape[1], x.shape[1]) if H is None else H
        H.mul_(tokens / (tokens + x.shape[0]))
        tokens += x.shape[0]
        x = x * math.sqrt(2.0 / tokens)
        H.addmm_(x.t(), x)
    return H


def _old_sparsegpt(weight, H, sparsity, blocksize=128, percdamp=0.01, n=0, m=0):
    """The previous sweep, line for line (unstructured, or N:M with ``n`` kept of every ``m``)."""
    W = weight.float().clone()
    rows, columns = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_cholesky(H, percdamp)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    to_prune = sparsity * rows
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        tmp = W1.square() / d1.reshape(1, -1).square()
        k = int(round(to_prune * i2)) - int(round(to_prune * i1))
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if k > 0 and not m:
            mask1.view(-1)[torch.topk(tmp.reshape(-1), k, largest=False, sorted=False).indices] = True
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if m and i % m == 0:
                tmp = W1[:, i : i + m].square() / d1[i : i + m].reshape(1, -1).square()
                mask1.scatter_(1, i + torch.topk(tmp, m - n, dim=1, largest=False).indices, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    W[pruned] = 0
    return W, ~pruned


def test_panelled_hessian_is_bit_identical_in_the_lower_triangle_and_symmetric():
    torch.manual_seed(0)
    xs = [torch.randn(3, 40, 1100) for _ in range(3)]  # 1100 > four 256-wide panels
    h = Hessian(1100)
    for x in xs:
        h.add(x)
    old = _old_hessian(xs)
    low = torch.tril(torch.ones(1100, 1100, dtype=torch.bool))
    assert torch.equal(h.H[low], old[low])
    assert torch.equal(h.H, h.H.t())
    torch.testing.assert_close(h.H, old)


def test_inverse_cholesky_in_place_is_the_reference_factor_bit_for_bit():
    # The inverse and its factor overwrite the first factor (one (in, in) matrix less at the peak): the values
    # must be those of the reference's three separate tensors.
    torch.manual_seed(2)
    X = torch.randn(700, 300) * torch.linspace(0.1, 3, 300)
    H = _old_hessian([X])
    expected = H.clone()
    expected.diagonal().add_(0.01 * torch.mean(torch.diag(H)))
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(expected)), upper=True)
    U = _inverse_cholesky(H.clone(), 0.01)
    assert torch.equal(U, expected)
    assert torch.equal(U, torch.triu(U))  # the lower triangle is zero, as a fresh upper factor's


def test_sweep_gives_the_reference_weights_and_masks_exactly():
    torch.manual_seed(1)
    W = torch.randn(48, 256)
    X = torch.randn(600, 256) * torch.linspace(0.1, 3, 256)
    H = _old_hessian([X])
    for sparsity, n, m in ((0.5, 0, 0), (0.7, 0, 0), (0.5, 2, 4), (0.5, 4, 8)):
        new_w, keep, _ = sparsegpt(W, H, sparsity, n, m, blocksize=64)
        old_w, old_keep = _old_sparsegpt(W, H, sparsity, blocksize=64, n=n, m=m)
        assert torch.equal(keep, old_keep)
        assert torch.equal(new_w, old_w)


@pytest.mark.parametrize("nm", [None, NM(2, 4)])
def test_one_sweep_for_layers_sharing_inputs_gives_each_layers_own_result(nm):
    torch.manual_seed(2)
    X = torch.randn(700, 384) * torch.linspace(0.1, 3, 384)
    H = _old_hessian([X])
    weights = [torch.randn(384, 384), torch.randn(128, 384), torch.randn(96, 384)]  # q, k, v (GQA)
    kept = [None, torch.rand(128, 384) > 0.2, None]
    n, m = (nm.n, nm.m) if nm else (0, 0)
    together = sparsegpt_group(weights, H, 0.6, n, m, kept=kept)
    for w, k, (new_w, keep, loss) in zip(weights, kept, together):
        alone_w, alone_keep, alone_loss = sparsegpt(w, H, 0.6, n, m, kept=k)
        assert torch.equal(keep, alone_keep) and torch.equal(new_w, alone_w)
        assert loss == pytest.approx(alone_loss, rel=1e-12)


def _reference_prune(model, calib, method, sparsity=0.5):
    """Block by block: a full pass with one forward hook per layer, prune, pass the pruned block again."""
    name, blocks = find_blocks(model)
    from prunekit.llm.sequential import capture_block_inputs, run_block

    batches = [{"input_ids": calib[i : i + 2]} for i in range(0, calib.shape[0], 2)]
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks, batches)
        for i, block in enumerate(blocks):
            layers = block_layers(block, f"{name}.{i}")
            seen = {layer.name: [] for layer in layers}
            handles = [layer.module.register_forward_hook(lambda m, a, o, n=layer.name: seen[n].append(a[0].detach()))
                       for layer in layers]
            for b in range(len(batches)):
                run_block(block, inputs, i, b)
            for handle in handles:
                handle.remove()
            for layer in layers:
                W = weight_matrix(layer)
                if method == "sparsegpt":
                    new_w, keep = _old_sparsegpt(W, _old_hessian(seen[layer.name]), sparsity)
                    masking.raw_parameter(layer.module, "weight").copy_(matrix_to_weight(layer, new_w))
                else:
                    acc = InputNorms(W.shape[1])
                    for x in seen[layer.name]:
                        acc.add(x)
                    keep = wanda_mask(W, acc.norms, sparsity)
                masking.attach(model, layer.weight_name, matrix_to_weight(layer, keep).contiguous(), copy=False)
            for b in range(len(batches)):
                inputs.hidden[b] = run_block(block, inputs, i, b).detach()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_prune_gives_the_reference_masks_and_weights(arch, method):
    calib = pk.llm.random_calibration(256, 4, 24)
    fast, slow = tiny_model(arch, seed=3), tiny_model(arch, seed=3)
    pk.llm.prune(fast, calib, method=method, sparsity=0.5, batch_size=2)
    _reference_prune(slow, calib, method)
    a, b = dict(fast.named_parameters()), dict(slow.named_parameters())
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # masks (parametrization originals) and weights, bit for bit
    for key, mask in masking.masks(fast).items():
        assert torch.equal(mask, masking.masks(slow)[key]), key
