"""The explicit choice of implementation for a kernel."""

from enum import Enum


class ScanBackend(str, Enum):
    """Which implementation computes the linear recurrence h_t = a_t * h_{t-1} + b_t.

    ``PYTORCH`` is the reference: plain tensor ops, runs on any device, under TorchScript and
    in float64. ``TRITON`` is the GPU kernel (also runs on CPU under ``TRITON_INTERPRET=1``).
    """

    PYTORCH = "pytorch"
    TRITON = "triton"

    @classmethod
    def parse(cls, value: "str | ScanBackend") -> "ScanBackend":
        if isinstance(value, ScanBackend):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(b.value for b in cls)
            raise ValueError(f"unknown scan backend {value!r}; choose one of: {choices}") from None
