"""Decoder-only transformer language model on byte-level tokens.

Data, in order of preference: `recipe.data.path` (a text file, a folder of text files, or a
pre-tokenized `.bin` of uint16 token ids), else the Python standard library's own `.py` sources,
a real corpus present on every machine. Samples are non-overlapping windows of `seq_len + 1` tokens;
the last `val_fraction` of the token stream is held out for evaluation.

Run:  python -m launcher recipe=gpt recipe.model.n_layers=6
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from launcher.recipe import BlockLayout, ConfigError
from recipes.chunked_loss import chunked_cross_entropy

BYTE_VOCAB = 256


@dataclass
class GPTModelConfig:
    vocab_size: int = 256
    """Embedding rows; at least 256 for byte tokens (GPT-2 shape: 50304)."""
    seq_len: int = 128
    """Tokens per sample (context length)."""
    d_model: int = 128
    """Hidden size."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads; must divide d_model."""
    mlp_ratio: int = 4
    """MLP hidden size = mlp_ratio * d_model."""
    dropout: float = 0.0
    """Dropout on embeddings, attention output and MLP output."""
    bias: bool = False
    """Biases in linear layers and LayerNorms (GPT-2 has them). Off by default: the key bias gets an
    exactly-zero gradient that Adam turns into noise-driven updates."""


@dataclass
class TextDataConfig:
    path: str | None = None
    """A text file, a folder of text files, or a `.bin` of uint16 tokens; default: stdlib sources."""
    max_bytes: int = 8_000_000
    """Read at most this many bytes of text (the .bin format is memory-mapped whole)."""
    val_fraction: float = 0.05
    """Tail of the token stream held out for evaluation."""


@dataclass
class GPTConfig:
    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    loss_chunk_tokens: int = 0
    """Cross-entropy this many tokens at a time (e.g. 4096), so the logits never exist in fp32 all at
    once (recipes/chunked_loss.py; the same loss to fp rounding); 0 = one plain cross_entropy call.
    Off by default: it costs ~13% of an eager step (GPT-2-small, one H200), and under train.compile the
    fused loss saves the same memory for free. For eager runs that would not fit otherwise."""

    def __post_init__(self) -> None:
        m, d = self.model, self.data
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(m, name) < 1:
                raise ConfigError(f"recipe.model.{name}", getattr(m, name), "must be >= 1")
        if m.d_model % m.n_heads:
            raise ConfigError(
                "recipe.model.n_heads",
                m.n_heads,
                f"must divide recipe.model.d_model={m.d_model}",
                f"try recipe.model.n_heads={_divisor_near(m.d_model, m.n_heads)}",
            )
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError("recipe.model.dropout", m.dropout, "must be in [0, 1)")
        if d.path is not None and not Path(d.path).exists():
            raise ConfigError(
                "recipe.data.path",
                d.path,
                "does not exist",
                "point it at a text file, a folder of text, or a .bin token file",
            )
        if d.path is None or not d.path.endswith(".bin"):
            if m.vocab_size < BYTE_VOCAB:
                raise ConfigError(
                    "recipe.model.vocab_size",
                    m.vocab_size,
                    "byte-level text needs at least 256 token ids",
                    "set recipe.model.vocab_size=256",
                )
        if not 0.0 < d.val_fraction < 1.0:
            raise ConfigError("recipe.data.val_fraction", d.val_fraction, "must be in (0, 1)")
        if d.max_bytes < 1:
            raise ConfigError("recipe.data.max_bytes", d.max_bytes, "must be >= 1")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(
                "recipe.loss_chunk_tokens", self.loss_chunk_tokens, "must be >= 0", "0 turns chunking off"
            )


def _divisor_near(n: int, k: int) -> int:
    return min((q for q in range(1, n + 1) if n % q == 0), key=lambda q: abs(q - k))


# --- model ------------------------------------------------------------------------------------


class Embedding(nn.Module):
    def __init__(self, cfg: GPTModelConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.dropout(self.tokens(idx) + self.positions(positions))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then MLP, each with a residual."""

    def __init__(self, cfg: GPTModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        d, bias = cfg.d_model, cfg.bias
        self.ln_attn = nn.LayerNorm(d, bias=bias)
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ln_mlp = nn.LayerNorm(d, bias=bias)
        self.mlp_in = nn.Linear(d, cfg.mlp_ratio * d, bias=bias)
        self.mlp_out = nn.Linear(cfg.mlp_ratio * d, d, bias=bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.resid_dropout(self.attn_out(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.resid_dropout(self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x)))))


class Head(nn.Module):
    def __init__(self, cfg: GPTModelConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln(x))


class GPT(nn.Module):
    """Token + position embedding, `n_layers` blocks, final norm and (untied) output projection.

    The output projection is not tied to the token embedding so the model can be split into
    pipeline stages with embedding and head on different ranks.
    """

    def __init__(self, cfg: GPTModelConfig) -> None:
        super().__init__()
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = Head(cfg)
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layers) so the residual stream's variance
        # does not grow with depth.
        for block in self.blocks:
            for proj in (block.attn_out, block.mlp_out):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# --- data -------------------------------------------------------------------------------------


class TokenWindows(Dataset):
    """Non-overlapping windows: sample i is tokens[i*T : i*T + T + 1], split into input and target."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.length = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        chunk = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def stdlib_sources() -> list[Path]:
    """The standard library's .py files in a fixed order (installed packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))


def read_text_bytes(files: list[Path], max_bytes: int) -> np.ndarray:
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8)


def load_tokens(cfg: TextDataConfig, vocab_size: int) -> np.ndarray:
    """The whole token stream (uint8 bytes for text, memory-mapped uint16 for .bin).

    Raises:
        ConfigError: no data found, or token ids outside the vocabulary.
    """
    if cfg.path is None:
        return read_text_bytes(stdlib_sources(), cfg.max_bytes)
    path = Path(cfg.path)
    if path.suffix == ".bin":
        size = path.stat().st_size
        if size == 0 or size % 2:
            raise ConfigError(
                "recipe.data.path",
                cfg.path,
                f"is {'empty' if size == 0 else f'{size} bytes, an odd size'}: a .bin holds uint16 token ids "
                "(2 bytes each)",
                "write the tokens with numpy: np.asarray(ids, dtype=np.uint16).tofile(path)",
            )
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise ConfigError(
                "recipe.data.path",
                cfg.path,
                f"holds token id {int(tokens.max())} >= recipe.model.vocab_size={vocab_size}",
                f"set recipe.model.vocab_size={int(tokens.max()) + 1} or larger",
            )
        return tokens
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return read_text_bytes(files, cfg.max_bytes)


# --- recipe -----------------------------------------------------------------------------------


class GPTRecipe:
    """Causal language modelling with cross-entropy over next tokens."""

    Config = GPTConfig
    layout = BlockLayout(pre="embed", blocks="blocks", post="head")

    def __init__(self, cfg: GPTConfig) -> None:
        self.cfg = cfg
        self.tokens_per_sample = cfg.model.seq_len
        self._splits: tuple[TokenWindows, TokenWindows] | None = None

    def build_model(self) -> nn.Module:
        return GPT(self.cfg.model)

    def _load(self) -> tuple[TokenWindows, TokenWindows]:
        if self._splits is None:
            tokens = load_tokens(self.cfg.data, self.cfg.model.vocab_size)
            cut = int(len(tokens) * (1 - self.cfg.data.val_fraction))
            seq = self.cfg.model.seq_len
            self._splits = TokenWindows(tokens[:cut], seq), TokenWindows(tokens[cut:], seq)
            if len(self._splits[0]) == 0:
                raise ConfigError(
                    "recipe.data.path",
                    self.cfg.data.path,
                    f"has too few tokens ({len(tokens)}) for one training sample of "
                    f"recipe.model.seq_len={seq}",
                    "use more data or a shorter seq_len",
                )
        return self._splits

    def train_dataset(self) -> Dataset:
        return self._load()[0]

    def eval_dataset(self) -> Dataset | None:
        return self._load()[1]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(logits, targets, self.cfg.loss_chunk_tokens)

    def generator(self, model: nn.Module):
        """Inference hook (optional in the recipe protocol): greedy text generation with a KV cache."""
        from recipes.gpt_generate import GreedyGenerator

        return GreedyGenerator(model, self.cfg.model.seq_len, self.cfg.model.vocab_size)
