"""Structured pruning of whole output channels (filters), and the smaller dense model it
leaves.

Which channels can go is a question of dependencies: a Conv's output channel feeds its
batch norm, the next layer's input channel (through a flatten: a block of its input
features), and in a residual network a sum with other layers' channels. The
dependency graph comes from ``torch-pruning`` (traced from one forward pass), the
maintained tool for this. We prune a layer's channels only where its group is
*uncoupled*: the layer itself and its batch norms on the output side, and one or more
consumers reading them. A group tied to other layers' outputs (a residual sum) is left
dense, with the reason: its channels are not this layer's alone, and the tracer maps
option-A shortcuts (strided slicing, zero-padding of new channels) as if they kept
channel positions, which is wrong. For CIFAR ResNets this prunes the first convolution
of every block, what Li et al. 2017 (Pruning Filters for Efficient ConvNets) prune there.

While training, a pruned channel is a row of zeros in the layer's :class:`PruneMask`
(it stacks with quant's fake-quantizer like any mask), and :func:`zero_followers_` holds
the layer's bias, its batch norms' scale and shift, and the consumers' input columns at
0 for that channel: the channel's output is exactly 0 and nothing reads it, so the
masked model computes (and quantizes) exactly what the cut one does.
:func:`shrink_channels_` then removes those channels
(``torch-pruning`` slices every dependent tensor): a smaller dense model computing the
same function, fewer parameters and MACs, faster. A saved shrunk model is rebuilt by
:func:`shrink_to_shapes_` (the same architecture, its layers cut to the saved shapes)
before its weights load: never a pickled module.

Example::

    groups, skipped = channel_groups(model, torch.zeros(1, 3, 32, 32))
    attach_masks_(model, lambda m, fqn: fqn in {g.root for g in groups})
    prune_channels_(model, groups, 0.5)        # half the channels of each group's root
    zero_followers_(model, groups)             # biases and batch norms of those channels
    cut_pruned_channels_(model, groups, torch.zeros(1, 3, 32, 32))  # smaller, dense
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from compress.prune import _lowest, _mask_of, default_prunable

__all__ = ["ChannelGroup", "channel_groups", "channels_to_prune", "prune_channels_",
           "zero_followers_", "held_at_zero", "zero_held_", "pruned_channels",
           "shrink_channels_", "cut_pruned_channels_", "shrink_to_shapes_",
           "lift_weight_parametrizations_", "restore_weight_parametrizations_"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class ChannelGroup:
    """A layer whose output channels can be pruned alone: ``root`` (a Linear/Conv with
    ``channels`` outputs), ``norms`` (its batch norms), ``consumers`` (the layers reading
    those channels)."""

    root: str
    channels: int
    norms: tuple[str, ...]
    consumers: tuple[str, ...]
    # consumer -> for each root channel, the consumer's input columns it feeds (one, or a
    # block of them through a flatten)
    columns: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = ()

    def columns_of(self, consumer: str, channels: torch.Tensor) -> torch.Tensor:
        """The consumer's input columns fed by ``channels`` of the root."""
        blocks = dict(self.columns)[consumer]
        picked = [i for c in channels.tolist() for i in blocks[c]]
        return torch.tensor(picked, dtype=torch.int64)


def _graph(model: nn.Module, example_input: torch.Tensor) -> Any:
    import torch_pruning as tp

    training = model.training
    model.eval()  # tracing runs a forward pass: leave the batch-norm statistics alone
    try:
        with torch.enable_grad():  # the tracer reads the autograd graph
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, verbose=False)
    finally:
        model.train(training)


def _out_fn(module: nn.Module) -> Any:
    import torch_pruning as tp

    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) \
        else tp.prune_conv_out_channels


def _members(graph: Any, module: nn.Module, idxs: list[int], names: Mapping[nn.Module, str]
             ) -> list[tuple[str, str, int]]:
    """(name, "out" | "in", indices) of every named module in the group."""
    group = graph.get_pruning_group(module, _out_fn(module), idxs=idxs)
    found = []
    for dep, member_idxs in group:
        name = names.get(dep.target.module)
        if name is None:  # the tracer's op nodes (relu, flatten, add, pad)
            continue
        side = "in" if "in_channels" in getattr(dep.handler, "__name__", "") else "out"
        found.append((name, side, tuple(int(getattr(i, "idx", i)) for i in member_idxs)))
    return found


def _columns(graph: Any, module: nn.Module, n: int, consumers: tuple[str, ...],
             names: Mapping[nn.Module, str]) -> tuple[tuple[str, tuple[tuple[int, ...], ...]],
                                                        ...]:
    """For each consumer, the input columns each root channel feeds (one query per
    channel: a flatten maps a channel to a block of features)."""
    per_channel = [{name: idx for name, side, idx in _members(graph, module, [c], names)
                    if side == "in"} for c in range(n)]
    return tuple((name, tuple(found.get(name, ()) for found in per_channel))
                 for name in consumers)


def channel_groups(model: nn.Module, example_input: torch.Tensor,
                   layers: Iterable[str] | None = None
                   ) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The uncoupled channel groups rooted at ``layers`` (default: every Linear/Conv), in
    model order, and ``{layer: why it is left dense}`` for the others."""
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    if layers is None:
        layers = [n for n, m in modules.items() if default_prunable(m, n)]
    graph = _graph(model, example_input)
    groups, skipped = [], {}
    for fqn in layers:
        module = modules[fqn]
        n = module.weight.shape[0]
        members = _members(graph, module, list(range(n)), names)
        outs = [(name, k) for name, side, k in members if side == "out" and name != fqn]
        # A norm without affine parameters cannot be held at 0 (it outputs -mean/std).
        tied = [name for name, _ in outs
                if not isinstance(modules[name], _NORMS) or modules[name].num_features != n
                or not modules[name].affine]
        consumers = tuple(dict.fromkeys(name for name, side, _ in members if side == "in"))
        if tied:
            skipped[fqn] = f"its channels are tied to {', '.join(tied[:3])}" + \
                (f" and {len(tied) - 3} more" if len(tied) > 3 else "") + \
                " (a residual sum): pruned only with them"
        elif not consumers:
            skipped[fqn] = "its outputs are the model's outputs"
        else:
            groups.append(ChannelGroup(fqn, n, tuple(name for name, _ in outs), consumers,
                                       _columns(graph, module, n, consumers, names)))
    return groups, skipped


def channels_to_prune(group: ChannelGroup, sparsity: float) -> int:
    """How many of the root's channels a sparsity prunes: round(sparsity x channels)."""
    return round(sparsity * group.channels)


def _row_scores(module: nn.Module) -> torch.Tensor:
    """L2 norm of each output channel's stored weights; -1 where already pruned."""
    mask = _mask_of(module).mask
    stored = module.parametrizations["weight"].original.detach().float()
    norms = stored.reshape(stored.shape[0], -1).norm(dim=1)
    kept = mask.reshape(mask.shape[0], -1).any(dim=1)
    return torch.where(kept, norms, torch.full_like(norms, -1.0))


@torch.no_grad()
def prune_channels_(model: nn.Module, groups: list[ChannelGroup], sparsity: float
                    ) -> nn.Module:
    """Grow each root's mask to ``round(sparsity x channels)`` whole output channels, the
    lowest L2 norms first (ties by position); masks only grow. A layer never loses its
    last channel (:func:`channels_to_prune` below ``channels`` is checked by the caller's
    config; here it is an error)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is invalid: allowed 0 <= sparsity < 1")
    for group in groups:
        module = model.get_submodule(group.root)
        if _mask_of(module) is None:
            raise ValueError(f"{group.root} has no pruning mask: call attach_masks_ first")
        k = channels_to_prune(group, sparsity)
        if k >= group.channels:
            raise ValueError(f"sparsity={sparsity} would prune all {group.channels} output "
                             f"channels of {group.root}")
        scores = _row_scores(module)
        if k <= int((scores < 0).sum()):
            continue  # masks only grow
        pruned = _lowest(scores, k)
        mask = _mask_of(module).mask
        mask[pruned] = 0.0
    return model


def pruned_channels(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """root -> indices of its pruned output channels (whole rows of zeros in its mask)."""
    found = {}
    for group in groups:
        mask = _mask_of(model.get_submodule(group.root)).mask
        found[group.root] = torch.nonzero(~mask.reshape(mask.shape[0], -1).any(1)).flatten()
    return found


def _stored(module: nn.Module) -> torch.Tensor:
    """The weight tensor the optimizer updates (under any parametrization)."""
    from torch.nn.utils import parametrize

    return module.parametrizations["weight"].original \
        if parametrize.is_parametrized(module, "weight") else module.weight


def held_at_zero(model: nn.Module, groups: list[ChannelGroup],
                 pruned: Mapping[str, torch.Tensor] | None = None
                 ) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """``(tensor, dim, indices)`` to hold at 0 for the pruned channels: the root's bias and
    its batch norms' weight and bias (dim 0), and the consumers' stored weight columns
    (dim 1) that read them. With them at 0 the masked model computes exactly what the
    cut one does, whatever the activation does at 0 and whatever range a quantizer
    takes over a consumer's row."""
    pruned = pruned_channels(model, groups) if pruned is None else pruned
    held = []
    for group in groups:
        idx = pruned[group.root]
        if idx.numel() == 0:
            continue
        tensors = [model.get_submodule(group.root).bias]
        for norm in group.norms:
            bn = model.get_submodule(norm)
            tensors += [bn.weight, bn.bias]
        held += [(t, 0, idx.to(t.device)) for t in tensors if t is not None]
        for consumer in group.consumers:
            stored = _stored(model.get_submodule(consumer))
            held.append((stored, 1, group.columns_of(consumer, idx).to(stored.device)))
    return held


@torch.no_grad()
def zero_held_(held: list[tuple[torch.Tensor, int, torch.Tensor]],
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """Set each held slice to 0, with every optimizer state tensor of its shape
    (momentum, moments): called after every optimizer step, since these carry no mask."""
    for t, dim, idx in held:
        t.index_fill_(dim, idx, 0.0)
        state = optimizer.state.get(t, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == t.shape:
                value.index_fill_(dim, idx, 0)


def zero_followers_(model: nn.Module, groups: list[ChannelGroup],
                    pruned: Mapping[str, torch.Tensor] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """:func:`zero_held_` of :func:`held_at_zero` (one call)."""
    zero_held_(held_at_zero(model, groups, pruned), optimizer)


def shrink_channels_(model: nn.Module, pruned: Mapping[str, torch.Tensor],
                     example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """Remove the ``pruned`` output channels (root -> indices) and everything that depends
    on them (batch norms, the consumers' input channels), in place; returns root -> the
    kept channels' indices. The model must hold no parametrizations (bake the masks, lift
    the rest: :func:`lift_weight_parametrizations_`)."""
    modules = dict(model.named_modules())
    graph = _graph(model, example_input)
    kept = {}
    for root, idx in pruned.items():
        module = modules[root]
        n = module.weight.shape[0]
        drop = sorted(int(i) for i in idx)
        kept[root] = torch.tensor(sorted(set(range(n)) - set(drop)), dtype=torch.int64)
        if drop:
            graph.get_pruning_group(module, _out_fn(module), idxs=drop).prune()
    return kept


def cut_pruned_channels_(model: nn.Module, groups: list[ChannelGroup],
                         example_input: torch.Tensor
                         ) -> tuple[dict[str, torch.Tensor], dict[str, list[nn.Module]]]:
    """Cut each group's pruned channels (mask rows of zeros) out of a masked model, in
    place: masks baked, other weight parametrizations lifted off, channels removed.
    Returns (root -> kept channel indices, the lifted parametrizations: cut their
    per-channel state, then :func:`restore_weight_parametrizations_`)."""
    pruned = pruned_channels(model, groups)
    lifted = lift_weight_parametrizations_(model)
    return shrink_channels_(model, pruned, example_input), lifted


def shrink_to_shapes_(model: nn.Module, shapes: Mapping[str, list[int]],
                      example_input: torch.Tensor) -> nn.Module:
    """Cut a freshly built model's layers to a saved shrunk model's shapes (state_dict key
    -> shape), in place, so its state_dict loads: the architecture rebuilt, not
    unpickled. A model whose shapes already match is returned unchanged."""
    modules = dict(model.named_modules())
    cut = {}
    for fqn, module in modules.items():
        key = f"{fqn}.weight"
        if default_prunable(module, fqn) and key in shapes:
            saved, have = shapes[key][0], module.weight.shape[0]
            if saved < have:
                cut[fqn] = torch.arange(saved, have)
    if cut:
        shrink_channels_(model, cut, example_input)
    state = model.state_dict()
    wrong = [k for k, s in shapes.items() if k in state and list(state[k].shape) != list(s)]
    if wrong:
        raise ValueError(f"the saved model's shapes do not match this architecture even "
                         f"after cutting channels: {', '.join(wrong[:4])}")
    return model


def lift_weight_parametrizations_(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Bake each pruning mask into its weight and take the weight's other
    parametrizations (a fake-quantizer) off, in place: ``fqn -> [parametrizations]`` to
    put back after a structural change. Works on a deep copy without touching the
    original (torch's remove_parametrizations edits the class the copy shares)."""
    from torch.nn.utils import parametrize

    from compress.prune import PruneMask

    lifted = {}
    for fqn, module in model.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        if set(module.parametrizations) != {"weight"}:
            raise ValueError(f"{fqn} has parametrizations besides its weight: "
                             f"{sorted(module.parametrizations)}")
        stack = module.parametrizations["weight"]
        weight, others = stack.original.detach(), []
        for p in stack:
            if isinstance(p, PruneMask):
                weight = p(weight)
            else:
                others.append(p)  # masks come first: nothing before them to re-apply
        requires_grad = stack.original.requires_grad
        module.__class__ = module.__class__.__bases__[0]
        del module._modules["parametrizations"]
        module.weight = nn.Parameter(weight.clone(), requires_grad=requires_grad)
        if others:
            lifted[fqn] = others
    return lifted


def restore_weight_parametrizations_(model: nn.Module, lifted: Mapping[str, list[nn.Module]]
                                     ) -> nn.Module:
    """Put back what :func:`lift_weight_parametrizations_` took off (in place), unchecked
    (their state was cut to the new shapes by the caller)."""
    from torch.nn.utils import parametrize

    for fqn, stack in lifted.items():
        module = model.get_submodule(fqn)
        for p in stack:
            parametrize.register_parametrization(module, "weight", p, unsafe=True)
    return model
