"""The LC (learning-compression) algorithm, pure torch (Carreira-Perpinan 2017; the LC
toolkit of Idelbayev & Carreira-Perpinan).

Compressing the weights ``w`` of a trained net means finding parameters ``theta`` whose
decompressed weights ``Delta(theta)`` both lie close to ``w`` and keep the loss low.
Compressing once after training (*direct compression*: ``theta = Pi(w)``) ignores the
loss; LC alternates two steps instead, with a penalty ``mu`` that grows
(``mu_k = mu_0 a^k``) until ``w`` and ``Delta(theta)`` meet:

- **L step**: train on ``loss(w) + mu/2 ||w - Delta(theta) - lambda/mu||^2``: the loss,
  pulled towards the current compressed weights;
- **C step**: ``theta = Pi(w - lambda/mu)``, the projection onto the compressed set (the
  nearest compressed weights; it uses no data), then the multipliers
  ``lambda <- lambda - mu (w - Delta(theta))`` (augmented Lagrangian; with
  ``lagrangian=False`` they stay 0: the quadratic-penalty method).

The first C step, from the reference weights, is direct compression; the final model is
``Delta(theta)`` of the last C step.

A layer's compression is a :class:`Compression`, written as text (the config's form):

- ``codebook:k=K``: K shared values, the optimal 1-D k-means (``kmeans1d`` through
  :class:`quant.CodebookFormat`);
- ``prune:keep=F`` / ``prune:kappa=N``: the largest-magnitude fraction F / count N of the
  layer's weights kept, the rest 0;
- ``lowrank:rank=R`` / ``alpha=A``: the truncated SVD of the weight
  matrix (:mod:`compress.lowrank`). ``alpha`` is LC's rank selection, the C step
  ``min_r mu/2 ||W - W_r||^2 + alpha r (m + n)`` (storage of the factors), so the rank
  rises as ``mu`` does; a layer for which no rank beats the dense one stays dense (an
  energy threshold is no C step: it would cut the rank again at every projection);
- ``int:bits=B``: symmetric uniform levels ``-(2^(B-1)-1) .. 2^(B-1)-1`` times one
  min-max scale (``max|w| / (2^(B-1)-1)``: the restricted range INT8 kernels use; the
  scale a projection of its own output finds again);
- ``none``: left as trained.

``kind:value`` is short for the kind's main field (``codebook:2``, ``prune:0.05``,
``lowrank:10``, ``int:4``). Every projection is idempotent: projecting compressed
weights returns them (tested).

Example::

    lc = LC({"fc1": parse_compression("lowrank:alpha=1e-6"),
             "fc3": parse_compression("codebook:2")}, mu0=9e-5, growth=1.1)
    lc.c_step(model, k=-1)               # direct compression of the reference weights
    for k in range(steps):               # L step k: loss + lc.penalty(model, k)
        train(model, extra_loss=lambda: lc.penalty(model, k))
        lc.c_step(model, k)
    lc.compressed_(model)                # the weights become Delta(theta)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from compress.lowrank import select_rank

__all__ = ["Compression", "COMPRESSIONS", "parse_compression", "parse_layer_map", "project",
           "LC", "layer_weight"]

# kind -> (its fields, the main field ``kind:value`` sets)
COMPRESSIONS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "none": ((), None),
    "codebook": (("k",), "k"),
    "prune": (("keep", "kappa"), "keep"),
    "lowrank": (("rank", "alpha"), "rank"),
    "int": (("bits",), "bits"),
}
_INTEGER_FIELDS = ("k", "kappa", "rank", "bits")


@dataclass(frozen=True)
class Compression:
    """One layer's compression: ``kind`` and exactly the one parameter it needs."""

    kind: str = "none"
    k: int | None = None
    keep: float | None = None
    kappa: int | None = None
    rank: int | None = None
    alpha: float | None = None
    bits: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in COMPRESSIONS:
            raise ValueError(f"compression {self.kind!r} is invalid: allowed "
                             f"{', '.join(COMPRESSIONS)}")
        allowed = COMPRESSIONS[self.kind][0]
        given = [f for f in ("k", "keep", "kappa", "rank", "alpha", "bits")
                 if getattr(self, f) is not None]
        stray = [f for f in given if f not in allowed]
        if stray:
            raise ValueError(f"{self.kind} takes {' or '.join(allowed) or 'no field'}, "
                             f"not {', '.join(stray)}")
        if allowed and len(given) != 1:
            raise ValueError(f"{self.kind} needs exactly one of {', '.join(allowed)} "
                             f"(got {', '.join(given) or 'none'})")
        checks = {"k": (2, 256), "kappa": (1, 10**12), "rank": (1, 10**6), "bits": (2, 16)}
        for name in given:
            value = getattr(self, name)
            if name in checks:
                lo, hi = checks[name]
                if isinstance(value, bool) or not isinstance(value, int) or \
                        not lo <= value <= hi:
                    raise ValueError(f"{self.kind}:{name}={value!r} is invalid: allowed an "
                                     f"integer in {lo}..{hi}")
            elif name == "keep":
                if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                    raise ValueError(f"{self.kind}:{name}={value!r} is invalid: allowed "
                                     "0 < value <= 1")
            elif not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{self.kind}:{name}={value!r} is invalid: allowed a finite "
                                 "value > 0")

    def __str__(self) -> str:
        fields = [f"{f}={getattr(self, f):.10g}" for f in COMPRESSIONS[self.kind][0]
                  if getattr(self, f) is not None]
        return self.kind + (":" + ",".join(fields) if fields else "")

    def check_layer(self, name: str, weight: torch.Tensor) -> None:
        """Raise ValueError where this compression cannot apply to ``weight`` (a rank above
        min(m, n), kappa above the weight count, a matrix that is not one)."""
        if self.kind == "lowrank":
            rows = weight.shape[0]
            full = min(rows, weight.numel() // max(rows, 1))
            if self.rank is not None and self.rank > full:
                raise ValueError(f"lowrank:rank={self.rank} is invalid for {name} "
                                 f"({rows}x{weight.numel() // rows}): allowed 1..{full}")
        if self.kind == "prune" and self.kappa is not None and self.kappa > weight.numel():
            raise ValueError(f"prune:kappa={self.kappa} is invalid for {name}: allowed "
                             f"1..{weight.numel()} (its weight count)")


def parse_compression(text: str) -> Compression:
    """``kind``, ``kind:value`` (the main field) or ``kind:field=value[,field=value]``."""
    kind, _, rest = str(text).strip().partition(":")
    kind = kind.strip()
    if kind not in COMPRESSIONS:
        raise ValueError(f"compression {text!r} is invalid: allowed kinds "
                         f"{', '.join(COMPRESSIONS)} (e.g. codebook:k=2, prune:keep=0.05, "
                         "lowrank:alpha=1e-6, int:bits=4)")
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        name, eq, raw = part.partition("=")
        if not eq:
            name, raw = COMPRESSIONS[kind][1] or "", part
            if not name:
                raise ValueError(f"compression {text!r}: none takes no value")
        name = name.strip()
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f"compression {text!r}: {name}={raw!r} is not a number") from None
        values[name] = int(number) if name in _INTEGER_FIELDS and number.is_integer() \
            else number
    unknown = [n for n in values if n not in COMPRESSIONS[kind][0]]
    if unknown:
        raise ValueError(f"compression {text!r}: {kind} takes "
                         f"{', '.join(COMPRESSIONS[kind][0]) or 'no field'}, not "
                         f"{', '.join(unknown)}")
    return Compression(kind, **values)


def parse_layer_map(text: str) -> dict[str, Compression]:
    """``"fc1=lowrank:alpha=1e-6; fc3=codebook:2"`` -> {layer: Compression}."""
    out = {}
    for item in filter(None, (p.strip() for p in str(text).split(";"))):
        name, eq, spec = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"{item!r} is invalid: allowed layer=compression, e.g. "
                             "fc3=codebook:2 (items separated by ;)")
        out[name.strip()] = parse_compression(spec)
    return out


# -- the projections (C steps) ----------------------------------------------------------
def _codebook(w: torch.Tensor, k: int) -> torch.Tensor:
    """The optimal k-means of the values (kmeans1d: exact in 1-D). Plain k-means, not
    quant's codebook with its reserved 0 entry for pruned tensors: the C step is the
    nearest point of the set of k-valued tensors, whatever share of zeros w holds."""
    import kmeans1d

    flat = w.detach().flatten().double().cpu()
    unique = torch.unique(flat)
    if len(unique) <= k:  # already k-valued: its own projection
        return w.detach().clone()
    clusters, centroids = kmeans1d.cluster(flat.numpy(), k)
    values = torch.as_tensor(centroids, dtype=torch.float64)[torch.as_tensor(clusters)]
    return values.to(w.dtype).reshape(w.shape).to(w.device)


def _prune(w: torch.Tensor, kept: int) -> torch.Tensor:
    """The ``kept`` largest |w| (ties: the first in order), the rest 0."""
    flat = w.flatten()
    if kept >= flat.numel():
        return w.clone()
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:kept]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(w.shape)


def _lowrank(w: torch.Tensor, spec: Compression, mu: float) -> tuple[torch.Tensor, int]:
    """(the best rank-r approximation, r); r = 0 means dense (alpha: no rank pays)."""
    matrix = w.reshape(w.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    # LC's C step min_r mu/2 tail(r) + alpha r (m + n) is select_rank's rule with 2 alpha / mu.
    alpha = None if spec.alpha is None else 2.0 * spec.alpha / mu
    rank = select_rank(s, *matrix.shape, rank=spec.rank, alpha=alpha)
    if rank == 0:
        return w.clone(), 0
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return approx.to(w.dtype).reshape(w.shape), rank


def _int_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    top = (1 << (bits - 1)) - 1
    return (w.detach().abs().max().float() / top).clamp_min(torch.finfo(torch.float32).eps)


def _int(w: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    from quant.intfmt import IntFormat

    return IntFormat(bits).fake_quantize(w, scale, torch.zeros((), dtype=torch.int64))


def project(spec: Compression, w: torch.Tensor, mu: float = 1.0) -> torch.Tensor:
    """``Delta(Pi(w))``: the compressed weights nearest ``w`` (``mu`` only matters for
    ``lowrank:alpha``). Raises ValueError on inf/NaN."""
    return _project(spec, w, mu)[0]


def _project(spec: Compression, w: torch.Tensor, mu: float
             ) -> tuple[torch.Tensor, dict[str, Any]]:
    """(the projection, what encodes it: a low-rank one's ``rank`` (0: kept dense), an int
    one's ``scale``)."""
    w = w.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot compress weights holding inf or NaN (the L step diverged)")
    if spec.kind == "none":
        return w.clone(), {}
    if spec.kind == "codebook":
        return _codebook(w, spec.k), {}
    if spec.kind == "prune":
        kept = spec.kappa if spec.kappa is not None else max(1, round(spec.keep * w.numel()))
        return _prune(w, kept), {}
    if spec.kind == "lowrank":
        approx, rank = _lowrank(w, spec, mu)
        return approx, {"rank": rank}
    scale = _int_scale(w, spec.bits)
    return _int(w, spec.bits, scale), {"scale": scale}


# -- the algorithm's state --------------------------------------------------------------
class LC:
    """The LC algorithm's state over a model's named layers: the compressed weights
    ``Delta(theta)`` and multipliers ``lambda`` of each, and the penalty schedule.
    ``k`` indexes L steps: L step k trains with ``mu_k = mu0 * growth**k``, and the C step
    after it projects with the same ``mu_k``; ``c_step(model, -1)`` is the direct
    compression (with ``mu_0``, the penalty at which L step 0 starts)."""

    def __init__(self, tasks: Mapping[str, Compression], mu0: float, growth: float,
                 lagrangian: bool = True) -> None:
        if not mu0 > 0 or not math.isfinite(mu0):
            raise ValueError(f"mu0={mu0} is invalid: allowed a finite value > 0")
        if not growth > 1 or not math.isfinite(growth):
            raise ValueError(f"growth={growth} is invalid: allowed a finite value > 1")
        self.tasks = {n: s for n, s in tasks.items() if s.kind != "none"}
        self.mu0, self.growth, self.lagrangian = float(mu0), float(growth), lagrangian
        self.targets: dict[str, torch.Tensor] = {}
        self.multipliers: dict[str, torch.Tensor] = {}
        # What encodes each target (the last C step's): a low-rank layer's rank (0:
        # dense), an int layer's scale.
        self.encodings: dict[str, dict[str, Any]] = {}

    def mu(self, k: int) -> float:
        return self.mu0 * self.growth ** max(k, 0)

    def _weight(self, model: nn.Module, name: str) -> torch.Tensor:
        return model.get_submodule(name).weight

    def c_step(self, model: nn.Module, k: int) -> None:
        """Project every compressed layer's ``w - lambda/mu_k``; then update lambda."""
        mu = self.mu(k)
        with torch.no_grad():
            for name, spec in self.tasks.items():
                w = self._weight(model, name).detach()
                lam = self.multipliers.get(name)
                shifted = w if lam is None else w - lam / mu
                self.targets[name], self.encodings[name] = _project(spec, shifted, mu)
                if self.lagrangian and k >= 0:
                    lam = torch.zeros_like(w) if lam is None else lam
                    self.multipliers[name] = lam - mu * (w - self.targets[name])

    def penalty(self, model: nn.Module, k: int) -> torch.Tensor | None:
        """``mu_k/2 sum ||w - Delta(theta) - lambda/mu_k||^2`` (None before the first C
        step)."""
        if not self.targets:
            return None
        mu = self.mu(k)
        total = None
        for name in self.tasks:
            w = self._weight(model, name)
            goal = self.targets[name]
            lam = self.multipliers.get(name)
            if lam is not None:
                goal = goal + lam / mu
            term = (w.float() - goal.float()).pow(2).sum()
            total = term if total is None else total + term
        return 0.5 * mu * total

    def distance(self, model: nn.Module) -> float:
        """``||w - Delta(theta)||^2 / ||w||^2`` over the compressed layers: 0 once the L
        step's weights have converged to the compressed ones."""
        num = den = 0.0
        with torch.no_grad():
            for name in self.targets:
                w = self._weight(model, name).double()
                num += float((w - self.targets[name].double()).pow(2).sum())
                den += float(w.pow(2).sum())
        return num / den if den else 0.0

    def ranks(self) -> dict[str, int]:
        """{layer: rank} of the low-rank layers' compressed weights (0: kept dense)."""
        return {n: e["rank"] for n, e in self.encodings.items() if "rank" in e}

    def compressed_(self, model: nn.Module) -> nn.Module:
        """Set every compressed layer's weight to ``Delta(theta)``, in place."""
        with torch.no_grad():
            for name, target in self.targets.items():
                self._weight(model, name).copy_(target)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"targets": {n: t.clone() for n, t in self.targets.items()},
                "multipliers": {n: t.clone() for n, t in self.multipliers.items()},
                "encodings": {n: dict(e) for n, e in self.encodings.items()}}

    def to_(self, device: torch.device | str) -> "LC":
        """Move the targets, multipliers and scales to ``device`` (a checkpoint is read
        onto the CPU; the model may be on a GPU)."""
        self.targets = {n: t.to(device) for n, t in self.targets.items()}
        self.multipliers = {n: t.to(device) for n, t in self.multipliers.items()}
        self.encodings = {n: {k: v.to(device) if isinstance(v, torch.Tensor) else v
                              for k, v in e.items()} for n, e in self.encodings.items()}
        return self

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.targets = {n: t.clone() for n, t in state["targets"].items()}
        self.multipliers = {n: t.clone() for n, t in state["multipliers"].items()}
        self.encodings = {n: dict(e) for n, e in state["encodings"].items()}


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of layer ``name`` (a ValueError naming the layers there are otherwise)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        what = "not in the model" if module is None else \
            f"a {type(module).__name__}, not a Linear or Conv2d"
        raise ValueError(f"layer {name!r} is {what}: allowed {', '.join(_layers(model))}")
    return module.weight


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
