"""The RecBLR sequence encoder: item embeddings in, one hidden vector per position out."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..fields import require, typed_fields
from ..kernels import Kernel, KernelBackend
from ..kernels.backend import kernel_table
from ..kernels.linear_scan.pytorch import packed_positions
from ..kernels.residual_norm import dropout_add_layer_norm
from .gated_recurrent import GatedRecurrent


@dataclass
class RecBLRConfig:
    """RecBLR hyper-parameters (docs/model.md); the paper's ML-1M values are the defaults.
    In a run config this is the section ``model.recblr``.

    ``kernels``: the implementation of the encoder's sequence kernels (the scan, the fused
    BD-LRU, the causal conv and the residual norm): ``auto`` (Triton on CUDA, the PyTorch
    reference elsewhere), ``triton`` or ``pytorch``. What runs instead while torch records a graph
    (compile, export, TorchScript) is declared in ``kernels/backend.py`` and shown in a run's
    ``resolved_config.json``.

    ``recompute_mix``: in training, the residual LayerNorms and the FFN of every layer that runs
    at all positions keep only their inputs for backward and are recomputed there
    (``torch.utils.checkpoint``; dropout masks replayed): ~4.4 KB less per position at d=64 for
    one more FFN forward.

    ``recompute_recurrence``: in training, every GatedRecurrent keeps only the conv output c and z
    for backward and recomputes the gate projection and the recurrence there: with the fused
    kernel 1.5 KB less per position at d=64 (the gate logits and h, fp32) for one more gate
    projection and fused forward per layer.

    ``fused_norms``: where the kernels are Triton, the embedding norm and the residual LayerNorms
    (with their dropout and residual add) run in one Triton kernel each way
    (kernels/residual_norm); false keeps torch's dropout, add and LayerNorm ops (and their RNG).
    """

    embedding_dim: int = 64
    num_layers: int = 2
    expand: int = 2
    conv_width: int = 4
    dropout: float = 0.2
    layer_norm_eps: float = 1e-12
    kernels: KernelBackend = KernelBackend.AUTO
    recompute_mix: bool = False
    recompute_recurrence: bool = False
    fused_norms: bool = True

    def __post_init__(self) -> None:
        typed_fields(self, "model.recblr")
        for name in ("embedding_dim", "num_layers", "expand", "conv_width"):
            require(getattr(self, name) >= 1, f"model.recblr.{name}={getattr(self, name)} must be >= 1")
        require(0.0 <= self.dropout < 1.0, f"model.recblr.dropout={self.dropout} must be in [0, 1)")
        require(self.layer_norm_eps > 0, f"model.recblr.layer_norm_eps={self.layer_norm_eps} must be > 0")


class RecBLRLayer(nn.Module):
    """A = LN(Dropout(GatedRecurrent(H)) + H); F = LN(A + Dropout(W2 Dropout(SiLU(W1 A + b1)) + b2))."""

    def __init__(self, config: RecBLRConfig):
        super().__init__()
        d = config.embedding_dim
        self.recurrent = GatedRecurrent(
            d, config.expand, config.conv_width, config.kernels, config.recompute_recurrence
        )
        self.recurrent_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(d, 4 * d)
        self.ffn_out = nn.Linear(4 * d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.norm_eps = config.layer_norm_eps
        self.fused_norms = config.fused_norms
        self.dropout = nn.Dropout(config.dropout)
        self.recompute_mix = config.recompute_mix

    def forward(
        self,
        hidden: Tensor,
        offsets: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
        rows: Optional[Tensor] = None,
    ) -> Tensor:
        """The layer's output at every position, or only at packed ``rows`` (the recurrence still
        runs over every position; the residual mix and the FFN run on the requested rows only)."""
        recurrent_out = self.recurrent(hidden, offsets, positions, rows)
        residual = hidden if rows is None else hidden[rows]
        if not torch.jit.is_scripting():
            if self.recompute_mix and self.training and rows is None and torch.is_grad_enabled():
                return checkpoint(self.mix, recurrent_out, residual, use_reentrant=False)
        return self.mix(recurrent_out, residual)

    def mix(self, recurrent_out: Tensor, hidden: Tensor) -> Tensor:
        """The residual LayerNorm and the FFN around the GatedRecurrent output."""
        mixed = self.residual_norm(recurrent_out, hidden, self.recurrent_norm.weight, self.recurrent_norm.bias)
        ffn = self.ffn_out(self.dropout(F.silu(self.ffn_in(mixed))))
        return self.residual_norm(ffn, mixed, self.ffn_norm.weight, self.ffn_norm.bias)

    def residual_norm(self, branch: Tensor, residual: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """LayerNorm(Dropout(branch) + residual): one Triton kernel each way when the kernels are
        Triton (kernels/residual_norm), torch ops otherwise."""
        p, eps = self.dropout.p, self.norm_eps
        if not torch.jit.is_scripting():
            return dropout_add_layer_norm(branch, residual, weight, bias, p, self.training, eps, self.norm_backend())
        return F.layer_norm(self.dropout(branch) + residual, [branch.shape[-1]], weight, bias, eps)

    def norm_backend(self) -> KernelBackend:
        """The residual norms' backend: the layer's kernels, or the PyTorch reference with
        ``fused_norms`` off."""
        return self.recurrent.kernels if self.fused_norms else KernelBackend.PYTORCH

    def sequence(self, hidden: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Padded [B, T, d] -> (output, conv input x [B, T, D], recurrent state h [B, T, D])."""
        y, x, h = self.recurrent.sequence(hidden)
        return self.mix(y, hidden), x, h

    def step(self, hidden: Tensor, conv_tail: Tensor, state: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One event: hidden [B, d] -> (output [B, d], new conv tail [B, k-1, D], new h [B, D])."""
        y, conv_tail, state = self.recurrent.step(hidden, conv_tail, state)
        return self.mix(y, hidden), conv_tail, state


class RecBLREncoder(nn.Module):
    """RecBLR over jagged or padded sequences of item embeddings. Causal: position t sees 0..t.

    Input, one of:
      - jagged: ``embeddings`` [N, d] and ``offsets`` [S+1], what an EmbeddingCollection returns
        (``jt.values()``, ``jt.offsets()``);
      - padded: ``embeddings`` [B, T, d], right-padded; optional ``lengths`` [B] zeroes the
        outputs at padded positions (padding never changes a real output either way).
    Output: the hidden state of the last layer, same shape as the input; with jagged input and
    ``rows`` [M] (indices into the N positions), only those rows [M, d]: the loss of the paper's
    protocol needs one row per sequence, and the last layer then mixes and projects M rows, not N.

    Example::

        >>> encoder = RecBLREncoder(RecBLRConfig(embedding_dim=8, num_layers=1, dropout=0.0))
        >>> values = torch.randn(5, 8)                     # two sequences, lengths 2 and 3
        >>> jagged = encoder(values, offsets=torch.tensor([0, 2, 5]))
        >>> padded = torch.zeros(2, 3, 8)
        >>> padded[0, :2], padded[1] = values[:2], values[2:]
        >>> dense = encoder(padded, lengths=torch.tensor([2, 3]))
        >>> torch.allclose(jagged[:2], dense[0, :2], atol=1e-6)
        True

    Incremental inference: the recurrent state of a user is one row of ``state_size()`` floats,
    per layer the causal-conv tail (the last k-1 conv inputs x, [k-1, D] row-major, oldest
    first) then the recurrent state h [D]; float32 (float64 for a float64 encoder).
    :meth:`forward_with_state` returns it after a padded history, :meth:`step` advances it by one
    event in O(layers * k * D) whatever the history's length, and the empty history's state is zeros.
    """

    def __init__(self, config: RecBLRConfig):
        super().__init__()
        self.config = config
        # Plain ints beside the dataclass, which TorchScript cannot read.
        self.embedding_dim = config.embedding_dim
        self.conv_width = config.conv_width
        self.channels = config.expand * config.embedding_dim
        self.input_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([RecBLRLayer(config) for _ in range(config.num_layers)])

    def forward(
        self,
        embeddings: Tensor,
        offsets: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        rows: Optional[Tensor] = None,
    ) -> Tensor:
        d = self.embedding_dim
        if embeddings.shape[-1] != d:
            raise ValueError(f"embeddings have width {embeddings.shape[-1]} but the encoder expects d={d}")
        positions: Optional[Tensor] = None
        if offsets is not None:
            if embeddings.dim() != 2:
                raise ValueError(f"jagged input must be [N, d] with offsets, got {list(embeddings.shape)}")
            positions = packed_positions(offsets, embeddings.shape[0])[1]
        elif embeddings.dim() != 3:
            raise ValueError(f"padded input must be [B, T, d], got {list(embeddings.shape)}; or pass offsets")
        if rows is not None and offsets is None:
            raise ValueError("rows select packed positions: pass jagged input with offsets")
        hidden = self.embedding_norm(embeddings)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, offsets, positions, rows if i == last else None)
        if offsets is None and lengths is not None:
            hidden = hidden * self._real_steps(hidden, lengths)
        return hidden

    def embedding_norm(self, embeddings: Tensor) -> Tensor:
        """input_norm(Dropout(embeddings)), through the fused kernel as the layers' residual norms."""
        norm = self.input_norm
        if not torch.jit.is_scripting():
            p = self.dropout.p  # the layers' norm backend (set_kernels switches them all)
            backend = self.layers[0].norm_backend()
            return dropout_add_layer_norm(embeddings, None, norm.weight, norm.bias, p, self.training, norm.eps, backend)
        return norm(self.dropout(embeddings))

    @staticmethod
    def _real_steps(hidden: Tensor, lengths: Tensor) -> Tensor:
        steps = torch.arange(hidden.shape[1], device=hidden.device)
        return (steps < lengths.unsqueeze(1)).unsqueeze(-1).to(hidden.dtype)

    @torch.jit.export
    def state_size(self) -> int:
        """Floats in one user's state: layers * (k-1 conv-tail rows + 1 recurrent row) * D."""
        return len(self.layers) * self.conv_width * self.channels

    @torch.jit.export
    def state_dtype(self) -> torch.dtype:
        return torch.float64 if self.input_norm.weight.dtype == torch.float64 else torch.float32

    @torch.jit.export
    def forward_with_state(self, embeddings: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """Padded [B, T, d] + lengths [B] in [0, T] -> (hidden [B, T, d] zero at padding, state [B, state_size()]).

        The state is the one after each history's last real event (zeros for a zero-length history).
        """
        hidden = self.input_norm(self.dropout(embeddings))
        k, channels = self.conv_width, self.channels
        batch = embeddings.shape[0]
        # Indices of the last k-1 conv inputs and of the last state; negative ones are before the start.
        tail_steps = lengths.unsqueeze(1) - (k - 1) + torch.arange(k - 1, device=lengths.device)
        tail_index = tail_steps.clamp(min=0).unsqueeze(-1).expand(batch, k - 1, channels)
        tail_real = (tail_steps >= 0).unsqueeze(-1)
        last_index = (lengths - 1).clamp(min=0).view(batch, 1, 1).expand(batch, 1, channels)
        last_real = (lengths > 0).view(batch, 1)
        states: List[Tensor] = []
        for layer in self.layers:
            hidden, x, h = layer.sequence(hidden)
            tail = torch.where(tail_real, x.gather(1, tail_index), torch.zeros_like(x[:, :1]))
            final = torch.where(last_real, h.gather(1, last_index)[:, 0], torch.zeros_like(h[:, 0]))
            states.append(tail.flatten(1).to(self.state_dtype()))
            states.append(final.to(self.state_dtype()))
        return hidden * self._real_steps(hidden, lengths), torch.cat(states, dim=1)

    @torch.jit.export
    def step(self, embeddings: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One new event per user: embeddings [B, d], state [B, state_size()] -> (hidden [B, d], new state)."""
        k, channels = self.conv_width, self.channels
        batch = embeddings.shape[0]
        hidden = self.input_norm(self.dropout(embeddings))
        states: List[Tensor] = []
        for i, layer in enumerate(self.layers):
            start = i * k * channels
            tail = state[:, start : start + (k - 1) * channels].reshape(batch, k - 1, channels)
            h = state[:, start + (k - 1) * channels : start + k * channels]
            hidden, tail, h = layer.step(hidden, tail, h)
            states.append(tail.flatten(1).to(self.state_dtype()))
            states.append(h.to(self.state_dtype()))
        return hidden, torch.cat(states, dim=1)


def set_kernels(module: nn.Module, backend: "KernelBackend | str") -> nn.Module:
    """Switches the sequence kernels of every GatedRecurrent inside ``module`` (and with them the
    residual norms of their layers) to ``backend``; returns ``module``."""
    backend = KernelBackend.parse(backend)
    for sub in module.modules():
        if isinstance(sub, GatedRecurrent):
            sub.kernels = backend
    return module


def kernels_in_use(module: nn.Module, device: torch.device) -> Dict[str, Dict[str, str]]:
    """{recording: {kernel: implementation}} of the RecBLR layers inside ``module`` on ``device``
    (``kernels.backend.kernel_table``; empty for a module without any)."""
    layers = [sub for sub in module.modules() if isinstance(sub, RecBLRLayer)]
    if not layers:
        return {}
    recurrent, norms = layers[0].recurrent.kernels, layers[0].norm_backend()
    backends = {kernel: recurrent for kernel in (Kernel.LINEAR_SCAN, Kernel.BDLRU, Kernel.CAUSAL_CONV)}
    return kernel_table({**backends, Kernel.RESIDUAL_NORM: norms}, device)
