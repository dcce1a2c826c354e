"""Packed artifacts: a quantized model as bytes whose size is real, and back.

Layout (no pickle): ``b"QSWP"``, format version (uint16), header length (uint32), a JSON
header, then the data. Quantized weights are their codes bit-packed at the format's bits
(INT4: two per byte; LNS: sign + exponent bits; codebook: ceil(log2 k) bits per index)
plus their parameters (scales, zero points, codebooks); every other tensor of the
``state_dict`` (biases, BatchNorm) is stored raw in its own dtype. A tensor with exact
zeros (a pruned weight) is stored sparse where that is smaller: the positions of its
non-zeros (a bitmask or relative indices, :mod:`quant.sparse`) and their codes or raw
values only; a quantized tensor's zeros get back their code (one per output row).
Files without a sparse tensor are written as version 1, which older readers read.
:func:`load_packed` restores a freshly built model of the same architecture whose outputs
equal the quantized model's bit for bit.

Example::

    quantize_(model, QuantConfig(weights=IntFormat(bits=4)))
    nbytes = save_packed(model, "lenet-int4.qsw")
    restored = load_packed("lenet-int4.qsw", build_lenet())
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quant.activations import attach_input_quant
from quant.codebook import CodebookFormat
from quant.codes import Encoded, pack_bits, packed_size, unpack_bits
from quant.floatfmt import FloatFormat
from quant.intfmt import IntFormat
from quant.lns import LNSFormat
from quant.sparse import Layout, best_layout, decode_positions, encode_positions
from quant.transforms import input_quantizers

__all__ = ["save_packed", "load_packed", "packed_shapes", "format_to_dict", "format_from_dict",
           "state_dict_bytes", "MAGIC", "VERSION"]

MAGIC, VERSION = b"QSWP", 2
_READS = (1, 2)  # version 2 adds sparse tensors
_FORMATS = {"int": IntFormat, "float": FloatFormat, "lns": LNSFormat, "codebook": CodebookFormat}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
           "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


def format_to_dict(fmt: Any) -> dict[str, Any]:
    kind = next(k for k, cls in _FORMATS.items() if isinstance(fmt, cls))
    spec = {"type": kind, **dataclasses.asdict(fmt)}
    if kind == "lns" and not spec["per_channel"]:
        del spec["per_channel"]  # added later: per-tensor files stay readable by older code
    return spec


def format_from_dict(spec: dict[str, Any]) -> Any:
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in _FORMATS:
        raise ValueError(f"format type={kind!r} is invalid: allowed one of {', '.join(_FORMATS)}")
    return _FORMATS[kind](**spec)


def _raw(t: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"cannot store a tensor of dtype {t.dtype}")
    view = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bf16
    return view.numpy().tobytes(), {"dtype": name, "shape": list(t.shape)}


def _from_raw(data: bytes, meta: dict[str, Any]) -> torch.Tensor:
    dtype = _DTYPES[meta["dtype"]]
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    t = torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(meta["shape"])
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _encoded_weights(model: nn.Module) -> dict[str, tuple[Any, Encoded]]:
    """state_dict key -> (format, codes) of every converted layer; the codes must still
    decode to the module's weight (it was not changed after convert_)."""
    found = {}
    for fqn, module in model.named_modules():
        if hasattr(module, "weight_encoded"):
            fmt, enc = module.weight_format, module.weight_encoded
            if not torch.equal(fmt.dequantize(enc, dtype=module.weight.dtype), module.weight):
                raise ValueError(f"{fqn}.weight changed after convert_: quantize it again")
            found[f"{fqn}.weight" if fqn else "weight"] = (fmt, enc)
    return found


def save_packed(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Write ``model`` (after :func:`quant.quantize_` or :func:`quant.convert_`); returns
    the file's size in bytes."""
    from torch.nn.utils import parametrize

    if any(parametrize.is_parametrized(m, "weight") for m in model.modules()):
        raise ValueError("the model is prepared for QAT but not converted: call "
                         "quant.convert_(model) first")
    encoded = _encoded_weights(model)
    entries, blobs, offset = [], [], 0

    def add(data: bytes) -> dict[str, int]:
        nonlocal offset
        blobs.append(data)
        span = {"offset": offset, "nbytes": len(data)}
        offset += len(data)
        return span

    # Sorted: a converted layer lists its weight after its bias (parametrizations re-add
    # it), a freshly built one before; the file must not depend on that.
    for key, tensor in sorted(model.state_dict().items()):
        if key in encoded:
            fmt, enc = encoded[key]
            params = {}
            for pname, value in enc.params.items():
                data, meta = _raw(value)
                params[pname] = {**meta, **add(data)}
            entry = {"name": key, "shape": list(tensor.shape),
                     "dtype": str(tensor.dtype).removeprefix("torch."),
                     "format": format_to_dict(fmt), "bits": enc.bits, "params": params}
            sparse = _sparse_codes(tensor, enc)
            if sparse is None:
                entry["codes"] = add(pack_bits(enc.codes, enc.bits))
            else:
                layout, nonzero, values, fill = sparse
                entry["codes"] = add(pack_bits(values, enc.bits))
                entry["sparse"] = {**_layout_dict(layout), "positions": add(
                    encode_positions(nonzero, layout)), "fill": add(pack_bits(fill, enc.bits))}
            entries.append(entry)
        else:
            sparse = _sparse_raw(tensor)
            if sparse is None:
                data, meta = _raw(tensor)
                entries.append({"name": key, **meta, "raw": add(data)})
            else:
                layout, nonzero, values = sparse
                data, meta = _raw(values)
                entries.append({"name": key, **meta, "shape": list(tensor.shape),
                                "raw": add(data), "sparse": {**_layout_dict(layout),
                                "positions": add(encode_positions(nonzero, layout))}})
    # Layers that quantize their input: load_packed attaches the same quantizers (their
    # ranges are buffers in the state_dict, stored raw above).
    activations = {fqn: {"format": format_to_dict(q.fmt), "observer": q.observer}
                   for fqn, q in input_quantizers(model).items()}
    version = VERSION if any("sparse" in e for e in entries) else 1
    header = json.dumps({"version": version, "tensors": entries, "activations": activations},
                        separators=(",", ":")).encode()
    with open(path, "wb") as fh:
        fh.write(MAGIC + struct.pack("<HI", version, len(header)) + header)
        for data in blobs:
            fh.write(data)
    return Path(path).stat().st_size


def load_packed(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load a packed artifact into ``model`` (built as the saved one was, float) in place;
    returns it. Quantized layers get their format and codes back (``weight_format``,
    ``weight_encoded``), so the model can be saved again unchanged."""
    raw, header, length = _read_header(path)
    data = memoryview(raw)[10 + length:]
    try:
        state, encodings = _read_tensors(header, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: damaged or inconsistent packed file ({exc})") from None
    modules = dict(model.named_modules())
    for fqn, spec in header.get("activations", {}).items():
        if not hasattr(modules[fqn], "input_quant"):
            attach_input_quant(modules[fqn], format_from_dict(spec["format"]), spec["observer"])
    model.load_state_dict(state)
    for q in input_quantizers(model).values():
        q.observing, q.enabled = False, True
    for key, (fmt, enc) in encodings.items():
        module = modules[key.rpartition(".")[0]]
        module.weight_format, module.weight_encoded = fmt, enc
    return model


def _read_header(path: str | os.PathLike[str]) -> tuple[bytes, dict[str, Any], int]:
    """(the file's bytes, its header, the header's length)."""
    raw = Path(path).read_bytes()
    if raw[:4] != MAGIC:
        raise ValueError(f"{path} is not a qsweep packed model (no {MAGIC!r} header)")
    try:
        version, length = struct.unpack("<HI", raw[4:10])
        header = json.loads(raw[10:10 + length]) if version in _READS else None
    except (struct.error, ValueError) as exc:
        raise ValueError(f"{path}: damaged header ({exc})") from None
    if version not in _READS:
        raise ValueError(f"{path} has packed format version {version}: allowed "
                         f"{', '.join(map(str, _READS))}")
    return raw, header, length


def packed_shapes(path: str | os.PathLike[str]) -> dict[str, list[int]]:
    """state_dict key -> shape of every tensor in a packed file (from its header): what
    rebuilds a channel-pruned architecture before :func:`load_packed`."""
    try:
        return {e["name"]: list(e["shape"]) for e in _read_header(path)[1]["tensors"]}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: damaged header ({exc})") from None


def _read_tensors(header: dict[str, Any], data: memoryview
                  ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[Any, Encoded]]]:
    spans = []

    def blob(span: dict[str, int]) -> bytes:
        start, end = span["offset"], span["offset"] + span["nbytes"]
        if not 0 <= start <= end <= len(data):
            raise ValueError(f"bytes {start}..{end} lie outside the {len(data)} data bytes")
        spans.append(span["nbytes"])
        return bytes(data[start:end])

    state, encodings = {}, {}
    for entry in header["tensors"]:
        name = entry["name"]
        if "raw" in entry:
            if "sparse" in entry:
                state[name] = _dense_raw(entry, blob)
            else:
                state[name] = _from_raw(blob(entry["raw"]), entry)
            continue
        fmt = format_from_dict(entry["format"])
        if entry["bits"] != fmt.bits:
            raise ValueError(f"{name}: {entry['bits']}-bit codes for a {fmt.bits}-bit format")
        numel = int(np.prod(entry["shape"])) if entry["shape"] else 1
        if "sparse" in entry:
            codes = _dense_codes(entry, blob, numel)
        else:
            codes = unpack_bits(blob(entry["codes"]), entry["bits"], numel)
        codes = codes.reshape(entry["shape"])
        params = {k: _from_raw(blob(v), v) for k, v in entry["params"].items()}
        enc = Encoded(codes, entry["bits"], params)
        state[name] = fmt.dequantize(enc, dtype=_DTYPES[entry["dtype"]])
        encodings[name] = (fmt, enc)
    if sum(spans) != len(data):
        raise ValueError(f"{len(data) - sum(spans)} bytes beyond the tensors the header lists")
    return state, encodings


def _layout_dict(layout: Layout) -> dict[str, Any]:
    return {"kind": layout.kind, "gap_bits": layout.gap_bits, "entries": layout.entries}


def _rows(shape: torch.Size | list[int]) -> int:
    return int(shape[0]) if len(shape) else 1


def _sparse_codes(weight: torch.Tensor, enc: Encoded
                  ) -> tuple[Layout, np.ndarray, torch.Tensor, torch.Tensor] | None:
    """(layout, non-zero positions, their codes, the code of the zeros per row) where
    storing the weight's zeros by position is smaller than its dense codes; None where
    not, or where a row's zeros do not share one code."""
    zero = (weight.detach().cpu() == 0).reshape(_rows(weight.shape), -1)
    if not bool(zero.any()):
        return None
    codes = enc.codes.detach().cpu().reshape(zero.shape)
    fill = torch.where(zero, codes, torch.full_like(codes, -1)).amax(1).clamp_min(0)
    if bool((zero & (codes != fill[:, None])).any()):
        return None  # a row whose zeros have two codes
    nonzero = (~zero).flatten().numpy()
    layout = best_layout(nonzero)
    sparse = layout.nbytes(nonzero.size) + packed_size(int(nonzero.sum()), enc.bits) + \
        packed_size(len(fill), enc.bits)
    if sparse >= packed_size(nonzero.size, enc.bits):
        return None
    return layout, nonzero, codes.flatten()[torch.from_numpy(nonzero)], fill


def _sparse_raw(tensor: torch.Tensor) -> tuple[Layout, np.ndarray, torch.Tensor] | None:
    """(layout, non-zero positions, their values) of a float tensor whose zeros are cheaper
    stored by position; None where not. A -0.0 comes back as +0.0 (equal to it in every
    comparison and product sum: a masked negative weight is -0.0)."""
    t = tensor.detach().cpu()
    if not t.is_floating_point() or t.dim() == 0:
        return None
    zero = t == 0
    if not bool(zero.any()):
        return None
    nonzero = (~zero).flatten().numpy()
    layout = best_layout(nonzero)
    itemsize = t.element_size()
    if layout.nbytes(nonzero.size) + int(nonzero.sum()) * itemsize >= t.numel() * itemsize:
        return None
    return layout, nonzero, t.flatten()[torch.from_numpy(nonzero)]


def _layout_of(entry: dict[str, Any]) -> Layout:
    spec = entry["sparse"]
    return Layout(spec["kind"], int(spec["gap_bits"]), int(spec["entries"]))


def _dense_codes(entry: dict[str, Any], blob: Any, numel: int) -> torch.Tensor:
    """The full code tensor of a sparse entry: each row's zero code, the stored codes at
    the non-zero positions."""
    bits, rows = entry["bits"], _rows(entry["shape"])
    nonzero = decode_positions(blob(entry["sparse"]["positions"]), _layout_of(entry), numel)
    fill = unpack_bits(blob(entry["sparse"]["fill"]), bits, rows)
    codes = fill.repeat_interleave(numel // rows if rows else 0)
    codes[torch.from_numpy(nonzero)] = unpack_bits(blob(entry["codes"]), bits,
                                                   int(nonzero.sum()))
    return codes


def _dense_raw(entry: dict[str, Any], blob: Any) -> torch.Tensor:
    numel = int(np.prod(entry["shape"]))
    nonzero = decode_positions(blob(entry["sparse"]["positions"]), _layout_of(entry), numel)
    values = _from_raw(blob(entry["raw"]), {**entry, "shape": [int(nonzero.sum())]})
    out = torch.zeros(numel, dtype=values.dtype)
    out[torch.from_numpy(nonzero)] = values
    return out.reshape(entry["shape"])


def state_dict_bytes(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Size on disk of the model's FP32 ``state_dict`` (``torch.save``): the baseline of a
    compression ratio."""
    torch.save(model.state_dict(), path)
    return Path(path).stat().st_size
