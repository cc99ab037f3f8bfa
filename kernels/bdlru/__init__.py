"""The fused behaviour-dependent linear recurrent unit (BD-LRU) of RecBLR.

From the conv output c, the gate logits [r; i] and the output-gate input z (docs/model.md):

    alpha_t = exp(-softplus(Lambda) * sigmoid(r_t))
    beta_t  = sqrt(1 - alpha_t^2) * sigmoid(i_t)
    h_t     = alpha_t * h_{t-1} + beta_t * c_t,   h_0 = 0, restarting at every sequence
    out_t   = SiLU(z_t) * h_t

The Triton kernel reads c, the gate logits and z once, forms alpha and beta in registers, scans,
and applies the output gate; backward recomputes alpha and beta from the same inputs and reads
the saved h instead of storing any gate. ``KernelBackend.PYTORCH`` is the reference.

Example::

    >>> c, z = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    >>> gate_logits, decay = torch.randn(2, 7, 16), torch.randn(8)
    >>> out = bdlru(c, gate_logits, z, decay, backend=KernelBackend.PYTORCH)        # [2, 7, 8]
    >>> packed = bdlru(c.reshape(14, 8), gate_logits.reshape(14, 16), z.reshape(14, 8), decay,
    ...                offsets=torch.tensor([0, 7, 14]), backend=KernelBackend.PYTORCH)
    >>> torch.allclose(out.reshape(14, 8), packed, atol=1e-6)
    True
"""

from typing import Optional

from torch import Tensor

from ..backend import Kernel, KernelBackend, implementation
from .pytorch import bdlru_gates, bdlru_pytorch

__all__ = ["bdlru", "bdlru_gates"]


def _check(c: Tensor, gate_logits: Tensor, z: Tensor, decay_param: Tensor, offsets: Optional[Tensor]) -> None:
    channels = c.shape[-1]
    if z.shape != c.shape:
        raise ValueError(f"z {tuple(z.shape)} must have the shape of c {tuple(c.shape)}")
    if gate_logits.shape[:-1] != c.shape[:-1] or gate_logits.shape[-1] != 2 * channels:
        raise ValueError(
            f"gate_logits must be [..., 2D] = {tuple(c.shape[:-1]) + (2 * channels,)}, got {tuple(gate_logits.shape)}"
        )
    if decay_param.shape != (channels,):
        raise ValueError(f"decay_param must be [D] = ({channels},), got {tuple(decay_param.shape)}")
    expected_dim = 3 if offsets is None else 2
    if c.dim() != expected_dim:
        layout = "dense [B, T, D]" if offsets is None else "packed [N, D] with offsets"
        raise ValueError(f"{layout} input expected, got c of shape {tuple(c.shape)}")
    devices = {t.device for t in (c, gate_logits, z, decay_param)}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def bdlru(
    c: Tensor,
    gate_logits: Tensor,
    z: Tensor,
    decay_param: Tensor,
    offsets: Optional[Tensor] = None,
    backend: KernelBackend = KernelBackend.TRITON,
) -> Tensor:
    """SiLU(z) * h for the BD-LRU recurrence driven by c (see the module docstring).

    Args:
        c: [B, T, D] (dense) or [N, D] (packed with ``offsets``), the SiLU'd conv output.
        gate_logits: [..., 2D], r in the first D channels and i in the last D.
        z: like c, the output-gate input.
        decay_param: [D], Lambda.
        offsets: None, or [S+1] int64 TorchRec offsets (zero-length sequences allowed).
        backend: ``TRITON`` (fused kernel), ``PYTORCH`` (reference) or ``AUTO`` (the kernel for
            CUDA tensors, the reference elsewhere).

    Returns:
        [like c] in c's dtype; accumulation in float32 at least.
    """
    _check(c, gate_logits, z, decay_param, offsets)
    if implementation(Kernel.BDLRU, backend, c.device) is KernelBackend.PYTORCH:
        return bdlru_pytorch(c, gate_logits, z, decay_param, offsets)
    from . import op as _op  # lazily: the reference needs no Triton

    return _op.bdlru_triton(c, gate_logits, z, decay_param, offsets)
