"""The one kernel choice and the one table of what runs while torch records a graph."""

import pytest
import torch

from recblr_torchrec.kernels import Kernel, KernelBackend
from recblr_torchrec.kernels.backend import Recording, implementation, kernel_table, recording

CUDA = torch.device("cuda")  # a device object only: nothing runs on it


def test_the_table_of_fallbacks_while_torch_records_a_graph():
    table = kernel_table({kernel: KernelBackend.TRITON for kernel in Kernel}, CUDA)
    assert table["eager"] == {kernel.value: "triton" for kernel in Kernel}
    # the scan and the BD-LRU are registered custom ops; Inductor fuses the conv's, the norm's and the loss's references
    assert table["torch.compile"] == {"linear_scan": "triton", "bdlru": "triton", "causal_conv": "pytorch"} | {
        "residual_norm": "pytorch",
        "softmax_ce": "pytorch",
    }
    for mode in ("torch.export", "torch.jit.trace", "torch.jit.script"):
        assert set(table[mode].values()) == {"pytorch"}, mode
    assert set(kernel_table({Kernel.BDLRU: KernelBackend.PYTORCH}, CUDA)["eager"].values()) == {"pytorch"}


def test_auto_resolves_by_device_and_triton_off_the_gpu_says_what_to_do(monkeypatch):
    assert implementation(Kernel.LINEAR_SCAN, "auto", CUDA) is KernelBackend.TRITON
    assert implementation(Kernel.LINEAR_SCAN, "auto", torch.device("cpu")) is KernelBackend.PYTORCH
    assert recording() is Recording.EAGER
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="the Triton backend needs CUDA tensors, got cpu"):
        implementation(Kernel.BDLRU, KernelBackend.TRITON, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'; choose one of: pytorch, triton, auto"):
        KernelBackend.parse("cuda")
