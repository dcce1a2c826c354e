"""Half-precision float formats: FP16 and BF16 (round to nearest, ties to even, as
``x.to(dtype)`` does).

Example::

    fmt = FloatFormat("bf16")
    w_q = fmt.fake_quantize(w)          # == w.to(torch.bfloat16).float()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.codes import Encoded

__all__ = ["FloatFormat", "FLOAT_DTYPES"]

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class FloatFormat:
    kind: str = "fp16"

    def __post_init__(self) -> None:
        if self.kind not in FLOAT_DTYPES:
            raise ValueError(f"kind={self.kind!r} is invalid: allowed one of "
                             f"{', '.join(FLOAT_DTYPES)}")

    @property
    def name(self) -> str:
        return self.kind

    @property
    def bits(self) -> int:
        return 16

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.kind]

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).to(x.dtype)

    def quantize(self, x: torch.Tensor) -> Encoded:
        """The 16-bit patterns as unsigned codes."""
        bits = x.detach().to(self.dtype).view(torch.int16).to(torch.int64)
        return Encoded(bits & 0xFFFF, 16, {})

    def dequantize(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        signed = torch.where(enc.codes >= 1 << 15, enc.codes - (1 << 16), enc.codes)
        return signed.to(torch.int16).view(self.dtype).to(dtype)
