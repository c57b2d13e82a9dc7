"""One-shot pruning of transformers and LLMs: SparseGPT, Wanda, N:M, attention heads, blocks and MLP width.

    import prunekit as pk
    calib = pk.llm.calibration_data(tokenizer, num_samples=128, seq_len=2048)   # built-in text by default
    pk.llm.prune(model, calib, method="sparsegpt", sparsity=0.5)                 # or pattern="2:4"
    pk.llm.prune(model, calib, method="wanda", sparsity=0.7, allocation="owl",   # or "sensitivity"
                 sequential="layer", recovery="lsq")                            # true sequential, least squares
    pk.llm.perplexity(model, heldout_ids, seq_len=2048)
    pk.finalize(model); model.save_pretrained("out")                            # loads as usual
    pk.llm.prune_from_disk("model_dir", "out", calib, method="wanda")           # bigger than memory: block by block

    pk.llm.prune_heads(model, calib, amount=0.25)        # Michel et al. importance, physical removal
    pk.llm.prune_layers(model, calib, num_layers=2)      # Gromov et al. angular distance
    pk.llm.prune_width(model, calib, mlp=0.25, heads=0.25, method="flap")  # FLAP, bias compensation, physical
    pk.llm.save_nm(model, "model.nm.safetensors", "2:4") # values + 2-bit indices
    pk.llm.save_compressed(model, "out")                 # compressed-tensors sparse-24-bitmask / sparse-bitmask
    pk.llm.distill(pruned, dense, calib, steps=200)      # recovery: logit KL (+ hidden_weight=...) to the dense model

Importing this package does not import ``transformers``; the functions that need it import it when
called.
"""

from . import sparsegpt, wanda  # noqa: F401  (registers the methods: magnitude, wanda, sparsegpt)
from .api import LLMPruneReport, prune
from .blocks import find_blocks
from .distillation import DistillReport, distill, distillation_kl
from .calibration import builtin_sentences, builtin_text, calibration_data, random_calibration, tokenize_text
from .ct_format import load_compressed, save_compressed
from .evaluation import embedding_similarity, mean_pooled_embeddings
from .heads import head_importance, mask_heads, prune_heads, remove_heads
from .hf import load_model, load_pretrained, save_pretrained
from .layers import angular_distances, layer_importance, prune_layers, remove_layers, skip_layers
from .methods import LLM_METHODS, LayerMethod
from .nm_format import load_nm, save_nm
from .perplexity import negative_log_likelihood, perplexity
from .streaming import needs_low_memory, prune_from_disk
from .sparsegpt import sparsegpt as sparsegpt_layer
from .wanda import wanda_mask, wanda_scores
from .width import WidthReport, prune_depth_width, prune_width, remove_mlp_channels, width_importance

__all__ = [
    "prune",
    "prune_from_disk",
    "needs_low_memory",
    "LLMPruneReport",
    "distill",
    "DistillReport",
    "distillation_kl",
    "perplexity",
    "negative_log_likelihood",
    "calibration_data",
    "random_calibration",
    "tokenize_text",
    "builtin_text",
    "builtin_sentences",
    "embedding_similarity",
    "mean_pooled_embeddings",
    "find_blocks",
    "head_importance",
    "mask_heads",
    "remove_heads",
    "prune_heads",
    "layer_importance",
    "angular_distances",
    "skip_layers",
    "remove_layers",
    "prune_layers",
    "prune_width",
    "prune_depth_width",
    "width_importance",
    "remove_mlp_channels",
    "WidthReport",
    "load_model",
    "save_pretrained",
    "load_pretrained",
    "save_nm",
    "load_nm",
    "save_compressed",
    "load_compressed",
    "LLM_METHODS",
    "LayerMethod",
    "sparsegpt_layer",
    "wanda_scores",
    "wanda_mask",
]
