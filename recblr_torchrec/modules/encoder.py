"""The RecBLR sequence encoder: item embeddings in, one hidden vector per position out."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import ScanBackend
from ..kernels.linear_scan.pytorch import packed_positions
from .gated_recurrent import GatedRecurrent


@dataclass
class RecBLRConfig:
    """RecBLR hyper-parameters (SPEC.md section 1); the paper's ML-1M values are the defaults."""

    embedding_dim: int = 64
    num_layers: int = 2
    expand: int = 2
    conv_width: int = 4
    dropout: float = 0.2
    layer_norm_eps: float = 1e-12
    scan_backend: str = "pytorch"


class RecBLRLayer(nn.Module):
    """A = LN(Dropout(GatedRecurrent(H)) + H); F = LN(A + Dropout(W2 Dropout(SiLU(W1 A + b1)) + b2))."""

    def __init__(self, config: RecBLRConfig):
        super().__init__()
        d = config.embedding_dim
        self.recurrent = GatedRecurrent(d, config.expand, config.conv_width, ScanBackend.parse(config.scan_backend))
        self.recurrent_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(d, 4 * d)
        self.ffn_out = nn.Linear(4 * d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: Tensor, offsets: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> Tensor:
        mixed = self.recurrent_norm(self.dropout(self.recurrent(hidden, offsets, positions)) + hidden)
        ffn = self.ffn_out(self.dropout(F.silu(self.ffn_in(mixed))))
        return self.ffn_norm(mixed + self.dropout(ffn))


class RecBLREncoder(nn.Module):
    """RecBLR over jagged or padded sequences of item embeddings. Causal: position t sees 0..t.

    Input, one of:
      - jagged: ``embeddings`` [N, d] and ``offsets`` [S+1], what an EmbeddingCollection returns
        (``jt.values()``, ``jt.offsets()``);
      - padded: ``embeddings`` [B, T, d], right-padded; optional ``lengths`` [B] zeroes the
        outputs at padded positions (padding never changes a real output either way).
    Output: the hidden state of the last layer, same shape as the input.

    Example::

        >>> encoder = RecBLREncoder(RecBLRConfig(embedding_dim=8, num_layers=1, dropout=0.0))
        >>> values = torch.randn(5, 8)                     # two sequences, lengths 2 and 3
        >>> jagged = encoder(values, offsets=torch.tensor([0, 2, 5]))
        >>> padded = torch.zeros(2, 3, 8)
        >>> padded[0, :2], padded[1] = values[:2], values[2:]
        >>> dense = encoder(padded, lengths=torch.tensor([2, 3]))
        >>> torch.allclose(jagged[:2], dense[0, :2], atol=1e-6)
        True
    """

    def __init__(self, config: RecBLRConfig):
        super().__init__()
        self.config = config
        self.input_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([RecBLRLayer(config) for _ in range(config.num_layers)])

    def forward(self, embeddings: Tensor, offsets: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> Tensor:
        d = self.config.embedding_dim
        if embeddings.shape[-1] != d:
            raise ValueError(f"embeddings have width {embeddings.shape[-1]} but the encoder expects d={d}")
        positions = None
        if offsets is not None:
            if embeddings.dim() != 2:
                raise ValueError(f"jagged input must be [N, d] with offsets, got {tuple(embeddings.shape)}")
            positions = packed_positions(offsets, embeddings.shape[0])[1]
        elif embeddings.dim() != 3:
            raise ValueError(f"padded input must be [B, T, d], got {tuple(embeddings.shape)}; or pass offsets")
        hidden = self.input_norm(self.dropout(embeddings))
        for layer in self.layers:
            hidden = layer(hidden, offsets, positions)
        if offsets is None and lengths is not None:
            steps = torch.arange(hidden.shape[1], device=hidden.device)
            hidden = hidden * (steps < lengths.unsqueeze(1)).unsqueeze(-1).to(hidden.dtype)
        return hidden


def set_scan_backend(module: nn.Module, backend: "ScanBackend | str") -> nn.Module:
    """Switches every GatedRecurrent inside ``module`` to ``backend``; returns ``module``."""
    backend = ScanBackend.parse(backend)
    for sub in module.modules():
        if isinstance(sub, GatedRecurrent):
            sub.scan_backend = backend
    return module


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """SPEC.md initialisation: Linear and Embedding N(0, std), biases 0, LayerNorm (1, 0).

    Convolutions keep PyTorch's default and Lambda its decay linspace.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
