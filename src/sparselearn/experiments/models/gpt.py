"""Small GPT-2-shaped decoders for language modelling, built from a config (no downloaded weights).

``gpt2-tiny``: token and position embeddings, ``n_layer`` pre-LayerNorm blocks (causal
self-attention with one fused query/key/value projection, then a 4x MLP with GELU), a final
LayerNorm and an output head tied to the token embedding -- the architecture of GPT-2 (Radford et
al. 2019, Sec. 2.3: LayerNorm moved to the input of each sub-block, a final LayerNorm, residual
projections initialised with a ``1/sqrt(N)`` scale for ``N`` residual layers) at a size a CPU
trains in minutes. The fused projection declares ``fused_blocks = ("q", "k", "v")``, so a
sparsifier treats its three blocks as three layers.

``hf-gpt2``: Hugging Face's ``GPT2LMHeadModel`` from a ``GPT2Config`` (randomly initialised; its
projections are ``transformers`` ``Conv1D`` layers, weights stored ``(in, out)``), wrapped to take
token ids and return logits; needs ``transformers`` (imported only when this model is built).

Both take ``(batch, T)`` token ids with ``T <= block_size`` and return logits ``(batch, T, vocab)``;
``num_classes`` is the vocabulary and ``input_shape`` is ``(block_size,)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

DEFAULT_VOCAB, DEFAULT_BLOCK = 256, 64


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused ``qkv`` projection (``[W_q; W_k; W_v]``)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.qkv.fused_blocks = ("q", "k", "v")  # three layers to a sparsifier (core/selection.py)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln_2(x)))))


class GPT(nn.Module):
    """A GPT-2-shaped decoder (see the module docstring). ``lm_head.weight`` is ``wte.weight``."""

    def __init__(self, vocab_size: int = DEFAULT_VOCAB, block_size: int = DEFAULT_BLOCK, n_layer: int = 2,
                 n_head: int = 4, n_embd: int = 64, dropout: float = 0.0):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                        ("n_head", n_head), ("n_embd", n_embd)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.block_size, self.input_shape = block_size, (block_size,)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (GPT-2; Press & Wolf 2017)
        # GPT-2's initialisation: N(0, 0.02), zero biases, and the projections that write into
        # the residual stream scaled by 1/sqrt(2 n_layer) (two residual layers per block, Sec. 2.3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.proj):
                nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size {self.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _block_size(input_shape: Sequence[int] | None, block_size: int | None) -> int:
    if block_size is not None:
        return int(block_size)
    if input_shape is None or len(tuple(input_shape)) != 1:
        raise ValueError(f"a language model's input_shape is (block_size,), got {input_shape!r}")
    return int(tuple(input_shape)[0])


def _language_model(fn):
    fn.task = "lm"  # trained on token streams (data sets with task "lm"), not on images
    return fn


@register_model("gpt2-tiny")
@_language_model
def gpt2_tiny(num_classes: int = DEFAULT_VOCAB, input_shape: Sequence[int] = (DEFAULT_BLOCK,), n_layer: int = 2,
              n_head: int = 4, n_embd: int = 64, dropout: float = 0.0, block_size: int | None = None) -> GPT:
    """A GPT-2-shaped decoder: 2 layers, 4 heads, width 64 by default (~0.12M parameters with 256
    tokens); ``num_classes`` is the vocabulary, ``block_size`` defaults to ``input_shape[0]``."""
    return GPT(num_classes, _block_size(input_shape, block_size), n_layer, n_head, n_embd, dropout)


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM that takes token ids and returns its logits."""

    def __init__(self, model: nn.Module, block_size: int):
        super().__init__()
        self.model, self.block_size, self.input_shape = model, block_size, (block_size,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx).logits


@register_model("hf-gpt2")
@_language_model
def hf_gpt2(num_classes: int = DEFAULT_VOCAB, input_shape: Sequence[int] = (DEFAULT_BLOCK,), n_layer: int = 2,
            n_head: int = 4, n_embd: int = 64, dropout: float = 0.0, block_size: int | None = None) -> HFCausalLM:
    """``transformers.GPT2LMHeadModel`` from a ``GPT2Config`` of these sizes, randomly initialised
    (Hugging Face's GPT-2 initialisation; nothing is downloaded)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise ImportError("model 'hf-gpt2' needs transformers: pip install transformers (or sparselearn[hf])") from e
    block = _block_size(input_shape, block_size)
    cfg = GPT2Config(vocab_size=num_classes, n_positions=block, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return HFCausalLM(GPT2LMHeadModel(cfg), block)
