"""Number formats and compression transforms (pure torch; no Ray, no MLflow).

The formats (INT4/8/16, FP16/BF16, LNS, codebooks), PTQ/QAT, pruning, low-rank and packed
artifacts land with the quantization issue. This package exists now so that the
layering (``sweeps -> trainables -> quant``) and the installed package set are fixed.
"""

__all__: list[str] = []
