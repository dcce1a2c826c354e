"""Named weight formats a trial can round its trained weights to (``evaluate.
weight_rounding=[lns8,int4]``): per tensor or per output channel, no calibration.

- ``lns8``: sign + 7-bit exponent, 8 codes per octave;
- ``lns4``: sign + 3-bit exponent on powers of two (7 magnitudes down to max/64, and 0);
- ``int16`` / ``int8`` / ``int4``: symmetric per-channel INT (torch's per_channel_symmetric
  min-max); int16 is seed 002's simulated INT16 (no INT16 kernels on CPU).

Example::

    from quant.named import WEIGHT_ROUNDING_FORMATS
    quantize_(model, QuantConfig(weights=WEIGHT_ROUNDING_FORMATS["int4"]))
"""

from __future__ import annotations

from quant.intfmt import IntFormat
from quant.lns import LNSFormat

__all__ = ["WEIGHT_ROUNDING_FORMATS"]

WEIGHT_ROUNDING_FORMATS = {
    "lns8": LNSFormat(bits=8, frac_bits=3),
    "lns4": LNSFormat(bits=4, frac_bits=0),
    "int16": IntFormat(bits=16, symmetric=True, per_channel=True),
    "int8": IntFormat(bits=8, symmetric=True, per_channel=True),
    "int4": IntFormat(bits=4, symmetric=True, per_channel=True),
}
