"""A SASRec-style Transformer encoder, the baseline RecBLR is measured against.

Same contract as :class:`RecBLREncoder` (jagged [N, d] + offsets, or padded [B, T, d]), so it
drops into the same model, data path, loss and evaluation. The layers follow RecBole's SASRec
(the implementation behind the paper's SASRec row): learned positions added to the item
embeddings, LayerNorm(Dropout(.)) on the input, then post-LN blocks of causal multi-head
attention and a GELU feed-forward. Attention runs through PyTorch's scaled_dot_product_attention.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fields import require, typed_fields
from ..kernels.linear_scan.pytorch import packed_positions, pad_packed


@dataclass
class SASRecConfig:
    """The SASRec-style baseline's hyper-parameters; in a run config, the section ``model.sasrec``.

    ``max_positions``: rows of the learned position table, the longest history it encodes
    (>= ``data.max_len``). ``attention_dropout``: None takes ``dropout``.
    """

    embedding_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    ffn_multiplier: int = 4
    dropout: float = 0.2
    attention_dropout: Optional[float] = None
    max_positions: int = 512
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        typed_fields(self, "model.sasrec")
        for name in ("embedding_dim", "num_layers", "num_heads", "ffn_multiplier", "max_positions"):
            require(getattr(self, name) >= 1, f"model.sasrec.{name}={getattr(self, name)} must be >= 1")
        require(
            self.embedding_dim % self.num_heads == 0,
            f"model.sasrec.embedding_dim={self.embedding_dim} must be divisible by "
            f"model.sasrec.num_heads={self.num_heads}",
        )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            require(value is None or 0.0 <= value < 1.0, f"model.sasrec.{name}={value} must be in [0, 1)")


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        d = config.embedding_dim
        self.num_heads = config.num_heads
        self.attention_dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(d, config.ffn_multiplier * d)
        self.ffn_out = nn.Linear(config.ffn_multiplier * d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: Tensor) -> Tensor:
        batch, steps, d = hidden.shape
        q, k, v = self.qkv(hidden).view(batch, steps, 3, self.num_heads, d // self.num_heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=True,  # right padding sits after every real key, so it is never attended
        )
        attended = self.out(attended.transpose(1, 2).reshape(batch, steps, d))
        return self._ffn(self.attn_norm(hidden + self.dropout(attended)))

    def _ffn(self, hidden: Tensor) -> Tensor:
        ffn = self.ffn_out(self.dropout(F.gelu(self.ffn_in(hidden))))
        return self.ffn_norm(hidden + self.dropout(ffn))

    def forward_at(self, hidden: Tensor, seq: Tensor, pos: Tensor) -> Tensor:
        """The block's output [M, d] at the M queries (sequence ``seq``, position ``pos``) only:
        each attends to its own sequence's keys 0..pos. For a few queries per sequence."""
        batch, steps, d = hidden.shape
        heads, width = self.num_heads, d // self.num_heads
        _, k, v = self.qkv(hidden).view(batch, steps, 3, heads, width).unbind(2)
        query = hidden[seq, pos]
        q = F.linear(query, self.qkv.weight[:d], self.qkv.bias[:d] if self.qkv.bias is not None else None)
        visible = torch.arange(steps, device=hidden.device)[None, :] <= pos[:, None]  # [M, T]
        attended = F.scaled_dot_product_attention(
            q.view(-1, heads, 1, width),
            k[seq].transpose(1, 2),
            v[seq].transpose(1, 2),
            attn_mask=visible[:, None, None, :],
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attended = self.out(attended.reshape(-1, d))
        return self._ffn(self.attn_norm(query + self.dropout(attended)))


class SASRecEncoder(nn.Module):
    """Causal Transformer over jagged or padded item embeddings; output has the input's shape.

    Positions count from each sequence's first item (0 .. T-1), so a jagged sequence and its
    right-padded copy see the same positions. With jagged input, ``rows`` [M] (packed indices)
    returns only those rows; when there is at most one per sequence (the paper's protocol) the last
    block computes its queries, residuals and FFN at those rows only.
    """

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.static_length = 0  # see static_padding
        self.positions = nn.Embedding(config.max_positions, config.embedding_dim)
        self.input_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([SASRecBlock(config) for _ in range(config.num_layers)])

    def static_padding(self, length: int) -> None:
        """Pad jagged batches to ``length`` positions (>= every history) instead of the longest
        history in the batch, which the host would have to read: with no read left the step can be
        captured in a CUDA graph (``train.cuda_graphs``). 0 restores the default. Causal attention
        never looks past a sequence's end, so the outputs are the same."""
        if not 0 <= length <= self.config.max_positions:
            raise ValueError(
                f"static padding length={length} must be in [0, max_positions={self.config.max_positions}] "
                "(raise model.sasrec.max_positions)"
            )
        self.static_length = length

    def forward(
        self,
        embeddings: Tensor,
        offsets: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        rows: Optional[Tensor] = None,
    ) -> Tensor:
        if rows is not None and offsets is None:
            raise ValueError("rows select packed positions: pass jagged input with offsets")
        if offsets is None:
            padded = embeddings
        else:
            seq_index, pos_index = packed_positions(offsets, embeddings.shape[0])
            padded = pad_packed(embeddings, offsets, seq_index, pos_index, self.static_length)
        steps = padded.shape[1]
        if steps > self.config.max_positions:
            raise ValueError(
                f"sequence length {steps} exceeds model.sasrec.max_positions={self.config.max_positions}; "
                "truncate the history or raise it"
            )
        hidden = padded + self.positions.weight[:steps].to(padded.dtype)
        hidden = self.input_norm(self.dropout(hidden))
        few_rows = rows is not None and 0 < rows.numel() <= padded.shape[0]
        for i, block in enumerate(self.blocks):
            if few_rows and i == len(self.blocks) - 1:
                return block.forward_at(hidden, seq_index[rows], pos_index[rows])
            hidden = block(hidden)
        if offsets is not None:
            packed = hidden[seq_index, pos_index]
            return packed if rows is None else packed[rows]
        if lengths is not None:
            real = torch.arange(steps, device=hidden.device) < lengths.unsqueeze(1)
            hidden = hidden * real.unsqueeze(-1).to(hidden.dtype)
        return hidden
