"""Recipes the memory estimator was not written for: a user's modules, loaded by path.

    python -m launcher recipe=bench.memory_recipes:ConvNetRecipe precision=bf16 train.micro_batch_size=128
    python -m launcher recipe=bench.memory_recipes:LSTMRecipe
    python -m launcher recipe=bench.memory_recipes:EncoderRecipe recipe.padding_mask=true

They widen what bench/bench_memory.py checks the estimator on: convolutions with BatchNorm, a
recurrent network (cuDNN's LSTM on the GPU), and bidirectional attention with and without a padding
mask. Data are synthetic and deterministic: memory depends on shapes, not on what the pixels hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from launcher.recipe import BlockLayout, ConfigError


def _synthetic(n: int, make, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(*make(n, gen))


# --- convolutional classifier with BatchNorm ----------------------------------------------------


@dataclass
class ConvNetConfig:
    image_size: int = 64
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    """Channels per stage; each stage after the first halves the resolution."""
    blocks_per_stage: int = 2
    classes: int = 100
    samples: int = 4096


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, relu: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        super().__init__(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class ResidualConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBNReLU(c_in, c_out, stride), ConvBNReLU(c_out, c_out, relu=False))
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class ConvNet(nn.Module):
    def __init__(self, cfg: ConvNetConfig) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, cfg.channels[0])
        blocks, c_in = [], cfg.channels[0]
        for i, c in enumerate(cfg.channels):
            for j in range(cfg.blocks_per_stage):
                blocks.append(ResidualConvBlock(c_in, c, 2 if i > 0 and j == 0 else 1))
                c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, cfg.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ConvNetRecipe:
    Config = ConvNetConfig
    layout = BlockLayout(pre="stem", blocks="blocks", post="head")

    def __init__(self, cfg: ConvNetConfig) -> None:
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        return ConvNet(self.cfg)

    def _data(self, n: int, seed: int) -> Dataset:
        s, k = self.cfg.image_size, self.cfg.classes
        return _synthetic(
            n, lambda n, g: (torch.randn(n, 3, s, s, generator=g), torch.randint(k, (n,), generator=g)), seed
        )

    def train_dataset(self) -> Dataset:
        return self._data(self.cfg.samples, 0)

    def eval_dataset(self) -> Dataset | None:
        return self._data(256, 1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)


# --- recurrent language model (cuDNN LSTM on the GPU) ------------------------------------------


@dataclass
class LSTMConfig:
    vocab_size: int = 256
    seq_len: int = 256
    hidden: int = 1024
    n_layers: int = 4
    samples: int = 4096
    cell: str = "lstm"
    """lstm, gru, rnn_tanh or lstm2 (two layers in one cuDNN call): the recurrent module of every block."""

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError("recipe.cell", self.cell, f"must be one of {', '.join(CELLS)}")


CELLS = {
    "lstm": lambda h: nn.LSTM(h, h, batch_first=True),
    "gru": lambda h: nn.GRU(h, h, batch_first=True),
    "rnn_tanh": lambda h: nn.RNN(h, h, batch_first=True),
    "lstm2": lambda h: nn.LSTM(h, h, num_layers=2, batch_first=True),
}


class LSTMLayer(nn.Module):
    """One recurrent layer (an LSTM unless `cell` says) as a block (the unit of activation checkpointing)."""

    def __init__(self, hidden: int, cell: str = "lstm") -> None:
        super().__init__()
        self.lstm = CELLS[cell](hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lstm(x)[0]


class LSTMModel(nn.Module):
    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(LSTMLayer(cfg.hidden, cfg.cell) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _token_pairs(n: int, seq_len: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    tokens = torch.randint(vocab, (n, seq_len + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class LSTMRecipe:
    Config = LSTMConfig
    layout = BlockLayout(pre="embed", blocks="blocks", post="head")

    def __init__(self, cfg: LSTMConfig) -> None:
        self.cfg = cfg
        self.tokens_per_sample = cfg.seq_len

    def build_model(self) -> nn.Module:
        return LSTMModel(self.cfg)

    def train_dataset(self) -> Dataset:
        c = self.cfg
        return _synthetic(c.samples, lambda n, g: _token_pairs(n, c.seq_len, c.vocab_size, g), 0)

    def eval_dataset(self) -> Dataset | None:
        c = self.cfg
        return _synthetic(64, lambda n, g: _token_pairs(n, c.seq_len, c.vocab_size, g), 1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# --- bidirectional attention (an encoder), with or without a padding mask ----------------------


@dataclass
class EncoderConfig:
    vocab_size: int = 8192
    seq_len: int = 512
    d_model: int = 768
    n_layers: int = 8
    n_heads: int = 12
    dropout: float = 0.0
    padding_mask: bool = False
    """Mask the keys of a padded tail (a boolean attn_mask, as for batches of unequal lengths)."""
    samples: int = 4096


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.dropout, self.padding_mask = cfg.n_heads, cfg.dropout, cfg.padding_mask
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        mask = None
        if self.padding_mask:  # the last eighth of every sequence is padding: no query attends to it
            mask = torch.arange(t, device=x.device) < t - t // 8
            mask = mask.view(1, 1, 1, t).expand(b, 1, t, t)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.vocab_size))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class EncoderRecipe:
    """Masked-token style objective on random tokens: predict each position's next token."""

    Config = EncoderConfig
    layout = BlockLayout(pre="embed", blocks="blocks", post="head")

    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg
        self.tokens_per_sample = cfg.seq_len

    def build_model(self) -> nn.Module:
        return Encoder(self.cfg)

    def train_dataset(self) -> Dataset:
        c = self.cfg
        return _synthetic(c.samples, lambda n, g: _token_pairs(n, c.seq_len, c.vocab_size, g), 0)

    def eval_dataset(self) -> Dataset | None:
        c = self.cfg
        return _synthetic(64, lambda n, g: _token_pairs(n, c.seq_len, c.vocab_size, g), 1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
