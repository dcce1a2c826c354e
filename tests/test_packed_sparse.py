"""Sparse tensors in the packed file: positions as a bitmask or relative indices (the
smaller), values only for the non-zeros; quantized codes and float values come back
exactly, the file shrinks by what the layout says, and a pruned-only trial packs itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn

import compress
import quant
from quant import IntFormat, LNSFormat, QuantConfig
from quant.codes import packed_size
from quant.sparse import Layout, best_layout, decode_positions, encode_positions
from trainables.loop import run_trial
from trainables.models import model_for_trial
from trainables.sessions import LocalSession


@pytest.mark.parametrize("density", [0.0, 0.001, 0.02, 0.1, 0.4, 0.9, 1.0])
@pytest.mark.parametrize("numel", [1, 9, 4099])
def test_positions_round_trip_in_the_smallest_layout(density: float, numel: int) -> None:
    nonzero = np.random.default_rng(numel).random(numel) < density
    layout = best_layout(nonzero)
    data = encode_positions(nonzero, layout)
    assert len(data) == layout.nbytes(numel)
    assert (decode_positions(data, layout, numel) == nonzero).all()
    # No other layout is smaller: the bitmask, and indices of every width by hand.
    positions = np.flatnonzero(nonzero)
    gaps = np.diff(positions, prepend=-1) - 1
    sizes = [(numel + 7) // 8] + [
        (int(gaps.size + (gaps // ((1 << b) - 1)).sum()) * b + 7) // 8 for b in range(1, 17)]
    assert len(data) == min(sizes)


def test_long_gaps_use_escape_entries() -> None:
    nonzero = np.zeros(100, dtype=bool)
    nonzero[[0, 50, 99]] = True
    layout = Layout("index", gap_bits=3, entries=3 + 49 // 7 + 48 // 7)
    assert (decode_positions(encode_positions(nonzero, layout), layout, 100) == nonzero).all()
    with pytest.raises(ValueError, match="point past"):
        decode_positions(encode_positions(nonzero, layout), layout, 60)


def _data_bytes(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    _, length = struct.unpack("<HI", raw[4:10])
    return len(raw) - 10 - length, json.loads(raw[10:10 + length])


def _pruned_linear(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    compress.attach_masks_(model)
    compress.prune_to_(model, sparsity)
    return model


@pytest.mark.parametrize("fmt", [IntFormat(4, symmetric=True, per_channel=True),
                                 IntFormat(8, symmetric=False, per_channel=True),
                                 LNSFormat(4, 0)])
def test_a_pruned_quantized_model_packs_sparse_and_reloads_exactly(tmp_path: Path, fmt) -> None:
    model = quant.quantize_(_pruned_linear(0.8), QuantConfig(weights=fmt))
    size = quant.save_packed(model, tmp_path / "sparse.qsw")
    data, header = _data_bytes(tmp_path / "sparse.qsw")
    assert header["version"] == 2
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    quant.load_packed(tmp_path / "sparse.qsw", fresh)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))
    expected_data = 0
    for name in ("0", "2"):
        ours, theirs = model.get_submodule(name), fresh.get_submodule(name)
        assert torch.equal(ours.weight_encoded.codes, theirs.weight_encoded.codes)
        nonzero = (ours.weight != 0).flatten().numpy()
        entry = next(e for e in header["tensors"] if e["name"] == f"{name}.weight")
        assert entry["sparse"]["kind"] == best_layout(nonzero).kind
        expected_data += best_layout(nonzero).nbytes(nonzero.size) + \
            packed_size(int(nonzero.sum()), fmt.bits) + packed_size(ours.weight.shape[0],
                                                                    fmt.bits)
        expected_data += sum(v["nbytes"] for v in entry["params"].values())
    expected_data += sum(e["raw"]["nbytes"] for e in header["tensors"] if "raw" in e)
    assert data == expected_data
    # Saved again after loading: the same bytes.
    assert quant.save_packed(fresh, tmp_path / "again.qsw") == size
    assert (tmp_path / "again.qsw").read_bytes() == (tmp_path / "sparse.qsw").read_bytes()


def test_a_dense_model_is_written_as_version_1(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = quant.quantize_(nn.Linear(16, 8), QuantConfig(weights=IntFormat(8)))
    quant.save_packed(model, tmp_path / "dense.qsw")
    assert _data_bytes(tmp_path / "dense.qsw")[1]["version"] == 1


def test_float_zeros_pack_by_position(tmp_path: Path) -> None:
    model = compress.bake_masks_(_pruned_linear(0.9))
    with torch.no_grad():
        model[2].bias[0] = -0.0
    quant.save_packed(model, tmp_path / "pruned.qsw")
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    quant.load_packed(tmp_path / "pruned.qsw", fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert fresh[2].bias[0] == 0  # -0.0 comes back as +0.0: equal, in every product sum
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))
    data, _ = _data_bytes(tmp_path / "pruned.qsw")
    dense = sum(v.numel() * 4 for v in model.state_dict().values())
    assert data < 0.25 * dense


def test_a_pruned_only_trial_packs_itself(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_root, "prune.schedule=oneshot", "prune.final_sparsity=0.9",
                      "prune.start=0.5", "prune.scope=global", "train.epochs=2")
    final = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "ckpt"))[-1]
    assert final["compression_ratio"] == final["fp32_bytes"] / final["packed_bytes"] > 4
    model = model_for_trial(cfg, (1, 28, 10))
    quant.load_packed(tmp_path / "ckpt" / "artifacts" / "model.qsw", model)
    assert compress.sparsity_of(model) == pytest.approx(final["sparsity"])
    assert final["sparsity"] == pytest.approx(0.9, abs=1e-4)
