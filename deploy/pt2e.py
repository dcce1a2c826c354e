"""Real INT8 on CPU through PT2E (torchao): export, calibrate, convert, compile.

The flow (``torchao.quantization.pt2e``; torch's own ``torch.ao.quantization`` eager/FX
paths are deprecated): ``torch.export`` the eval model -> ``prepare_pt2e`` with the x86
inductor quantizer (per-channel symmetric INT8 weights, per-tensor asymmetric UINT8
activations) -> run calibration batches through the observers -> ``convert_pt2e``.

The converted module is the *reference* INT8 model: every quantized op is written as
quantize -> dequantize -> FP32 op, so eager it computes the fake-quant numbers of its own
grid. Only ``torch.compile`` with inductor's ``freezing`` on pattern-matches those into
real INT8 kernels (oneDNN qconv/qlinear); without freezing the dequantized FP32 ops run
and INT8 is ~2x slower than FP32 (../shared/STACK_NOTES.md).

``reduce_range``: activations use 7 bits on CPUs without VNNI (AVX2 only): they
multiply u8 x s8 with 16-bit intermediate sums that saturate at the full 8-bit range
(measured on an AVX2 Zen: 4-8 dB SQNR lost on ResNet-20 without it). With VNNI or AMX
(:func:`has_vnni`) the products accumulate in 32 bits and the full range is kept: the
default follows the CPU.

Example::

    reference = quantize_int8(model, calibration_batches, example)   # eager QDQ
    fast = compile_frozen(reference)                                  # INT8 kernels
    logits = fast(images)
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["quantize_int8", "compile_frozen", "release_compiled", "export_batch_dynamic",
           "has_vnni"]


def has_vnni() -> bool:
    """Whether this CPU multiplies INT8 with 32-bit accumulation (AVX512-VNNI, AVX-VNNI or
    AMX-INT8, from /proc/cpuinfo): then full-range 8-bit activations do not saturate."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def export_batch_dynamic(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (in eval mode) with a symbolic batch size."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # A batch-1 example would specialize the batch to 1: export with two rows.
    sample = example.expand(max(2, example.shape[0]), *example.shape[1:]).contiguous()
    return torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))


def quantize_int8(model: nn.Module, calibration: Iterable[torch.Tensor],
                  example: torch.Tensor, reduce_range: bool | None = None) -> nn.Module:
    """The PT2E reference INT8 model of ``model`` (not changed): per-channel INT8 weights,
    per-tensor activation ranges from the ``calibration`` batches (the x86 quantizer's
    histogram observers). ``reduce_range``: 7-bit activations (None: where the CPU lacks VNNI).
    Raises RuntimeError naming the step that failed."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    model = copy.deepcopy(model).eval()
    try:
        graph = export_batch_dynamic(model, example).module()
    except Exception as exc:
        raise RuntimeError(f"torch.export could not trace the model: {_first_line(exc)}"
                           ) from exc
    _split_shared_modules(graph)
    if reduce_range is None:
        reduce_range = not has_vnni()
    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    prepared = prepare_pt2e(graph, quantizer)
    seen = 0
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
            seen += 1
    if not seen:
        raise ValueError("INT8 calibration needs at least one batch; got none")
    return _drop_unused(convert_pt2e(prepared))


def _drop_unused(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Delete the tensors the graph no longer reads: convert_pt2e leaves the float
    weights (and folded batch-norm buffers) beside their INT8 copies, and a saved model
    would carry both (ResNet-18: 56 MB instead of 11)."""
    used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    for name in [k for k in graph.state_dict() if k not in used]:
        owner, _, attr = name.rpartition(".")
        module = graph.get_submodule(owner) if owner else graph
        delattr(module, attr)
    graph.delete_all_unused_submodules()
    return graph


def _split_shared_modules(graph: torch.fx.GraphModule) -> None:
    """Give each call of a module called more than once its own name in the nodes'
    ``nn_module_stack``. The quantizer groups nodes into patterns by the module they came
    from; torchvision's ResNet block calls one ``self.relu`` twice, and the two calls in
    one group fail its pattern match ("Input partition has more than one output node").
    A call is a contiguous run of nodes from the module."""
    previous: dict[str, torch.fx.Node] = {}  # module fqn -> the last node seen from it
    calls: dict[str, int] = {}
    last_node = None
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            last_node = node
            continue
        key, (fqn, cls) = list(stack.items())[-1]
        if fqn in previous and previous[fqn] is not last_node:  # a new call of it
            calls[fqn] = calls.get(fqn, 0) + 1
        previous[fqn] = last_node = node
        if calls.get(fqn):
            stack = dict(stack)
            stack[key] = (f"{fqn}.call{calls[fqn]}", cls)
            node.meta["nn_module_stack"] = stack


def compile_frozen(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` with inductor freezing (weights folded as constants: what lets the
    INT8 patterns lower to INT8 kernels; FP32 models get their fastest compiled path too).
    The first call of each new input shape compiles (seconds to a minute). Freezing is
    switched on around each call only (a process-wide switch would freeze every later
    compile of the process: a reused trial worker's too); :func:`release_compiled`
    drops the compiled graphs and their frozen weights."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(module, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(x)

    return run


def release_compiled() -> None:
    """Forget every compiled graph of this process (and the weights frozen into them):
    after a trial's export, so that a reused worker neither keeps them in memory nor
    runs into the recompile limit with the next trial's models."""
    torch._dynamo.reset()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
