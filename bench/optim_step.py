"""Cost of one optimizer step per optimizer, side by side, as a ratio against torch's own
SGD (``torch_sgd``; the registry's ``gd``/``sgd`` are it plus the non-finite check of
optim.base) on the parameters of a real model (ResNet-20, 0.27 M parameters, or LeNet):
the multiplicative updates do more elementwise work per weight; is it visible? What does
the per-step inf/NaN check cost (``sgd`` vs ``torch_sgd``)?

    python bench/optim_step.py --model resnet20 --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import time

from _util import finish, header, row


def main() -> None:
    import torch

    import optim
    from trainables.config import ModelConfig
    from trainables.models import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = header("optim_step")
    names = ["torch_sgd", "sgd", "torch_adamw", "gd", "gd_sign", "eg", "egpm", "adam_gd",
             "adam_eg", "madam", "lns_madam"]
    models, optimizers = {}, {}
    for name in names:
        torch.manual_seed(0)
        models[name] = build_model(ModelConfig(name=args.model), 3, 32, 10)
        if name == "torch_adamw":  # torch's own (foreach) AdamW: what adam_gd computes
            optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-3)
        elif name == "torch_sgd":  # what sgd computes, without the non-finite check
            optimizers[name] = torch.optim.SGD(models[name].parameters(), lr=1e-3,
                                               momentum=0.9, nesterov=False)
        else:
            momentum = {"momentum": 0.9, "nesterov": False} \
                if "momentum" in optim.reads(name) else {}  # build refuses what it can't use
            optimizers[name] = optim.build_for_model(name, models[name], bias_lr=0.01,
                                                     lr=1e-3, **momentum)
        for p in models[name].parameters():
            p.grad = torch.randn_like(p) * 1e-2
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):  # interleaved: every optimizer sees the same noise
        for name in names:
            start = time.perf_counter()
            optimizers[name].step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch_sgd"])
    results = {}
    for name in names:
        median = statistics.median(times[name])
        results[name] = {"median_ms": 1e3 * median, "ratio_vs_torch_sgd": median / base}
        row(name, median_ms=1e3 * median, ratio_vs_torch_sgd=median / base)
    finish(env, {"model": args.model, "repeats": args.repeats, "steps": results})


if __name__ == "__main__":
    main()
