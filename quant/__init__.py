"""Number formats and compression transforms, pure torch (no Ray, no MLflow).

Formats, one frozen config class each, all with ``fake_quantize(x)`` (quantize then
dequantize, same shape and dtype) and ``quantize(x) -> Encoded`` / ``dequantize(enc)``
(unsigned codes of ``bits`` bits plus parameters, what a packed artifact stores):

- :class:`IntFormat` (INT2..INT16, symmetric or affine, per tensor or per channel; torch's
  observer and fake-quant conventions, bit for bit),
- :class:`FloatFormat` (fp16, bf16),
- :class:`LNSFormat` (logarithmic; the grid LNS-Madam trains on),
- :class:`CodebookFormat` (optimal 1-D k-means per tensor, k = 2..256).

Transforms (weights): ``quantize_`` (PTQ), ``prepare_qat_`` / ``convert_`` (QAT with a
straight-through estimator), per-layer formats by name pattern (:class:`QuantConfig`);
``save_packed`` / ``load_packed``: the quantized model as bit-packed codes on disk.
Training "all in LNS" (LNS-Madam): ``QuantConfig(activations=LNSFormat(...),
gradients=LNSFormat(...))`` also rounds layer inputs forward and gradients backward.

Example::

    from quant import IntFormat, QuantConfig, quantize_, save_packed
    quantize_(model, QuantConfig(weights=IntFormat(bits=4, symmetric=True, per_channel=True)))
    save_packed(model, "model.qsw")
"""

from quant.activations import OBSERVERS, ActivationQuant
from quant.codebook import CodebookFormat
from quant.codes import Encoded, pack_bits, packed_size, unpack_bits
from quant.floatfmt import FloatFormat
from quant.gradients import gradient_rounded, round_gradient
from quant.intfmt import IntFormat
from quant.lns import LNSFormat
from quant.packed import load_packed, packed_shapes, save_packed, state_dict_bytes
from quant.transforms import (
    QuantConfig,
    calibrate_,
    convert_,
    input_quantizers,
    prepare_qat_,
    quantize_,
    quantized_layers,
    strip_qat_,
)

__all__ = ["OBSERVERS", "ActivationQuant", "CodebookFormat", "Encoded", "FloatFormat",
           "IntFormat", "LNSFormat", "QuantConfig", "calibrate_", "convert_", "input_quantizers",
           "load_packed", "packed_shapes", "pack_bits", "packed_size", "prepare_qat_", "quantize_",
           "quantized_layers", "save_packed", "state_dict_bytes", "unpack_bits",
           "gradient_rounded", "round_gradient", "strip_qat_"]
