"""Number formats and compression transforms, pure torch (no Ray, no MLflow).

Today it holds the logarithmic number system that LNS-Madam trains in; the quantization
issue adds INT/FP formats, PTQ/QAT, pruning, low-rank and packed artifacts beside it.

Example::

    from quant import LNSFormat
    q = LNSFormat(bits=4, frac_bits=0).quantize(torch.randn(16))
"""

from quant.lns import LNSFormat

__all__ = ["LNSFormat"]
