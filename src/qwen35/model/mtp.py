"""Qwen 3.5's multi-token prediction (MTP) layer: a guess at the token after next, for speculative decoding.

From the main model's final-normed hidden state at position i and the token at i+1:

    x = fc(cat[RMSNorm_e(embed(token[i+1])), RMSNorm_h(hidden[i])])     (2H -> H)
    x = one full-attention decoder layer (its own K/V cache, the main model's MLP or MoE form)
    guess for token[i+2] = lm_head(RMSNorm(x))

at position i, with the main model's embedding and output head. Chained, the normed output stands in
for the hidden state of the next position (vLLM's qwen3_next_mtp does the same). GGUF names the weights
`blk.L.nextn.{eh_proj, enorm, hnorm, shared_head_norm}` and the layer's own under `blk.L`.
"""

from __future__ import annotations

import torch

from qwen35.engine.cache import HybridCache
from qwen35.errors import Qwen35Error
from qwen35.kernels.quant_linear import QuantExperts, QuantLinear
from qwen35.model.config import FULL_ATTENTION
from qwen35.model.qwen35 import DecoderLayer, Qwen35Network, layer_rms_norm


def first_rows(head: QuantLinear, rows: int) -> QuantLinear:
    """The output head cut to the vocabulary's first `rows` tokens (all of it for 0): a guess there costs a
    fraction of the whole head. Byte-level BPE numbers tokens in merge order, so the first ids are the
    common ones (the first 32K are 93% of the tokens of English prose and code, the first 64K 97.5%)."""
    if rows <= 0 or rows >= head.out_features:
        return head
    cut = QuantLinear(head.blocks[:rows], head.type_id, rows, head.in_features)
    cut.mode = head.mode  # the fast kernels' own weight form, made for these rows only
    return cut


class MultiTokenPredictor:
    def __init__(self, network: Qwen35Network, vocabulary: int = 0, kv_settings: dict | None = None):
        """`kv_settings`: how the layer keeps K/V (Model.kv_settings: the main model's -ctk/-ctv, as llama.cpp's
        MTP context takes them); None: float32."""
        c = network.config
        weights = network.mtp_weights
        if c.mtp_num_layers < 1 or "mtp.fc" not in weights:
            raise Qwen35Error("this model file has no MTP layer (nextn_predict_layers is 0, or its weights were "
                              "left out): use a GGUF converted with it, or a draft model (-md)")
        self.network = network
        self.eps = c.rms_norm_eps
        # Loading leaves these weights as they are in the file: now they take the main model's kernels' form.
        mode = network.lm_head.mode
        for module in weights.values():
            if isinstance(module, (QuantLinear, QuantExperts)) and module.mode != mode:
                module.mode = mode
        self.fc = weights["mtp.fc"]
        self.embedding_norm, self.hidden_norm = weights["mtp.pre_fc_norm_embedding"], weights["mtp.pre_fc_norm_hidden"]
        self.layer = DecoderLayer(c, weights, "mtp.layers.0", FULL_ATTENTION)
        self.final_norm = weights["mtp.norm"]
        self.head = first_rows(network.lm_head, vocabulary)  # guesses only: it may leave rare tokens out
        self.kv_settings = dict(kv_settings or {})

    @property
    def device(self) -> torch.device:
        return self.layer.device

    def make_cache(self, start_position: int = 0) -> HybridCache:
        """An empty one-row cache for the layer's K/V whose first pair sits at `start_position` (pairs before
        it, from a cache the main model restored, were never seen: they are left out of the attention)."""
        kv = self.network.attention_store(self.device, 1, **self.kv_settings)
        lengths = torch.zeros(1, dtype=torch.long, device=self.device)
        return HybridCache([kv], lengths, torch.full((1,), start_position, dtype=torch.long, device=self.device))

    def __call__(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: HybridCache, logits: bool = True):
        """Pairs (hidden [1, T, H] of positions i, next_ids [1, T] the tokens at i+1) appended to `cache`:
        (logits [1, T, vocab] guessing the tokens at i+2 (vocab: the head's rows, see `first_rows`), the
        normed outputs [1, T, H] that chain).
        Without `logits` (a prompt's pairs only fill the cache) the output head is skipped: None."""
        network = self.network
        embedded = network.embed_tokens.rows(next_ids.to(network.input_device)).to(self.device)
        joined = torch.cat([layer_rms_norm(embedded, self.embedding_norm, self.eps),
                            layer_rms_norm(hidden.to(self.device), self.hidden_norm, self.eps)], dim=-1)
        x = self.fc(joined)
        h = layer_rms_norm(x, self.layer.input_norm, self.eps)
        positions = cache.default_positions(next_ids.shape[1])
        starts, rope, mask = network.attention_inputs(cache, positions)
        _, out = self.layer(x, h, cache.layers[0], starts, rope, mask, self.final_norm)
        cache.advance(next_ids.shape[1], positions)
        out = out.to(self.head.blocks.device)
        return (self.head(out).float() if logits else None), out
