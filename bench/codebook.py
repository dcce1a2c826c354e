"""Codebooks for real layers: the exact 1-D k-means (``kmeans1d``, what
``quant.CodebookFormat`` uses) against seeded k-means++ (scikit-learn, 1 and 10 inits),
SQNR and seconds per layer, side by side, on a LeNet-5 trained for one epoch on MNIST.

    QSWEEP_DATA=../shared/data python bench/codebook.py [--k 2 4 16 64]
"""

from __future__ import annotations

import argparse
import math
import time

import _util
import numpy as np
import torch


def sqnr(w: np.ndarray, q: np.ndarray) -> float:
    return 10 * math.log10(float((w ** 2).sum()) / float(((w - q) ** 2).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 16, 64])
    args = parser.parse_args()
    env = _util.header("codebook")

    import tempfile

    from sklearn.cluster import KMeans

    from quant import CodebookFormat
    from trainables import LocalSession, TrialConfig, run_trial
    from trainables.sessions import load_state_file

    cfg = TrialConfig().with_overrides([
        "data.name=mnist", "model.name=lenet", "model.channels=[6,16]",
        "model.hidden=[120,84]", "model.kernel_size=5", "optim.lr=0.1", "train.epochs=1"])
    with tempfile.TemporaryDirectory() as tmp:
        run_trial(cfg, LocalSession(checkpoint_dir=tmp))
        state = load_state_file(tmp)["model"]
    layers = {k: v.double().flatten().numpy() for k, v in state.items() if v.dim() >= 2}
    results = []
    for k in args.k:
        for name, w in layers.items():
            row = {"k": k, "layer": name, "n": w.size}
            start = time.perf_counter()
            q = CodebookFormat(k).fake_quantize(torch.from_numpy(w).float()).double().numpy()
            row["exact_s"], row["exact_db"] = time.perf_counter() - start, sqnr(w, q)
            for inits in (1, 10):
                start = time.perf_counter()
                km = KMeans(k, init="k-means++", n_init=inits, random_state=0).fit(
                    w.reshape(-1, 1))
                q = km.cluster_centers_[km.labels_, 0]
                row[f"kpp{inits}_s"] = time.perf_counter() - start
                row[f"kpp{inits}_db"] = sqnr(w, q)
            results.append(row)
            _util.row(f"k={k} {name} (n={w.size})",
                      exact_db=row["exact_db"], kpp1_db=row["kpp1_db"],
                      kpp10_db=row["kpp10_db"], exact_s=row["exact_s"],
                      kpp1_s=row["kpp1_s"], kpp10_s=row["kpp10_s"])
    _util.finish(env, {"rows": results})


if __name__ == "__main__":
    main()
