"""Greedy generation for the GPT recipe: a KV cache, and batches of prompts of different lengths.

The GPT recipe's inference hook (`GPTRecipe.generator`) returns a `GreedyGenerator`. Batches are
left-padded: every prompt ends at the same column, so each decoding step appends one column for the
whole batch. Padding is invisible to real tokens: each row's positions start at 0 at its first real
token, and no query attends to a pad key. A pad query attends to itself only, so its row holds
finite garbage, never NaN (a NaN value vector would poison real rows through 0 * NaN).
Weights are the trained model's own modules, so int8-quantized exports generate the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GreedyGenerator:
    """Batched greedy decoding over a `recipes.gpt.GPT` (or a quantized copy of one).

    Args:
        model: the GPT module (`embed`, `blocks`, `head`), in eval mode.
        max_len: the model's context length (its position table): prompt + new tokens must fit.
        vocab_size: token ids must be below this.
    """

    def __init__(self, model: nn.Module, max_len: int, vocab_size: int) -> None:
        self.model, self.max_len, self.vocab_size = model, max_len, vocab_size

    @staticmethod
    def encode(text: str) -> list[int]:
        """Byte-level tokens, as the recipe trains on."""
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(tokens: list[int]) -> str:
        return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        """The greedy continuation of each prompt, `max_new_tokens[i]` tokens long.

        Rows with a smaller budget are cut from the batch's longest run: greedy decoding of a row does
        not depend on the tokens generated after it, nor on the other rows.
        """
        device = next(self.model.parameters()).device
        batch, longest, steps = len(prompts), max(map(len, prompts)), max(max_new_tokens)
        total = longest + steps
        assert total <= self.max_len, "callers check prompt + max_new_tokens against max_len"
        pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        columns = torch.arange(total, device=device)
        real = columns[None, :] >= pad[:, None]  # [batch, total]: which key columns hold real tokens
        positions = (columns[None, :] - pad[:, None]).clamp_min(0)
        cache = KVCache(len(self.model.blocks), batch, total, device)
        out = torch.empty(batch, steps, dtype=torch.long, device=device)
        logits = self._forward(tokens, 0, positions, real, cache)
        for t in range(steps):
            out[:, t] = logits.argmax(dim=-1)
            if t + 1 < steps:
                logits = self._forward(out[:, t : t + 1], longest + t, positions, real, cache)
        rows = out.tolist()
        return [row[:n] for row, n in zip(rows, max_new_tokens)]

    def _forward(
        self,
        tokens: torch.Tensor,
        start: int,
        positions: torch.Tensor,
        real: torch.Tensor,
        cache: KVCache,
    ) -> torch.Tensor:
        """Run columns [start, start + T) through the model, filling the cache; last column's logits."""
        model = self.model
        width = tokens.shape[1]
        end = start + width
        x = model.embed.tokens(tokens) + model.embed.positions(positions[:, start:end])
        query_cols = torch.arange(start, end, device=tokens.device)
        key_cols = torch.arange(end, device=tokens.device)
        causal = key_cols[None, :] <= query_cols[:, None]  # [T, end]
        own = key_cols[None, :] == query_cols[:, None]
        mask = (causal[None] & real[:, None, :end]) | own[None]  # [batch, T, end]
        mask = mask[:, None]  # broadcast over heads
        for layer, block in enumerate(model.blocks):
            x = x + self._attention(block, x, layer, start, end, mask, cache)
            x = x + block.mlp_out(F.gelu(block.mlp_in(block.ln_mlp(x))))
        return model.head(x[:, -1])

    @staticmethod
    def _attention(
        block: nn.Module,
        x: torch.Tensor,
        layer: int,
        start: int,
        end: int,
        mask: torch.Tensor,
        cache: KVCache,
    ) -> torch.Tensor:
        b, t, d = x.shape
        heads = block.n_heads
        q, k, v = block.qkv(block.ln_attn(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        keys, values = cache.append(layer, k, v, start, end)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return block.attn_out(y.transpose(1, 2).reshape(b, t, d))


class KVCache:
    """Keys and values of every layer for columns already seen, preallocated to the batch's length."""

    def __init__(self, layers: int, batch: int, total: int, device: torch.device) -> None:
        self.layers, self.batch, self.total, self.device = layers, batch, total, device
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:  # shapes (heads, head dim, dtype) are known at the first call
            shape = (self.batch, k.shape[1], self.total, k.shape[3])
            self.keys[layer] = torch.empty(shape, dtype=k.dtype, device=self.device)
            self.values[layer] = torch.empty(shape, dtype=v.dtype, device=self.device)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]
