"""Functions of tensors traced once into graphs of tensor operations, simplified, and replayed.

For inputs of a fixed signature (shapes, dtypes, devices) a Pyro program takes the same branches,
makes the same sites and calls the same tensor operations on every call: only the values change.
:func:`trace` runs such a function once under ``make_fx`` (``torch.fx.experimental.proxy_tensor``,
real tensors) and records every ATen operation it calls — Pyro's distributions, the networks, the
backward passes of ``torch.autograd.grad`` — as one ``torch.fx.GraphModule`` whose replay skips
Pyro's Python. The training step (:mod:`pyrovae.capture`), the annealing density and the HMC
transition of AIS (:mod:`pyrovae.annealing`, :mod:`pyrovae.hmc`) and the evaluation pass
(:mod:`pyrovae.fast_eval`) are all traced here.

What a graph fixes: tensors that are not inputs are its constants (referenced, not copied: an
in-place change is seen, a replaced attribute is not), Python numbers and branches are baked in.
A function whose Python reads tensor values (data-dependent control flow) cannot be traced:
``make_fx`` raises, and the callers fall back to eager evaluation.

Noise: a random operation (``aten.normal_``, ``aten.rand_like``, …) is recorded as itself, so each
replay draws fresh values from torch's generator, on the CPU the same stream in the same order as
the eager function. Tracing itself draws nothing: the generators' states are saved before and
restored after (:func:`preserved_rng`).

After tracing: dead code is removed (random operations are kept, so that the stream stays in
step); :func:`simplify` drops operations that return their input unchanged; :func:`fold_constants`
computes once what depends on no input (an encoder applied to fixed data, transposed weights).

Replay (:func:`replay`, ``mode=``):

``"graph"``
    The graph module called op by op, without autograd (any backward pass is in the graph).
``"inductor"``
    The graph compiled by inductor on the spot (``torch._inductor.compile``, without TorchDynamo):
    fused kernels, seconds to compile per signature. Its random operations draw from inductor's own stream, not the eager
    one. Where compiling fails (no C++ compiler, an unsupported operation) the plain graph is
    replayed, after a logged warning. On the CPU the graph compiled has each bias-adding matrix
    product ``addmm(b, A, B)`` as ``mm(A, B) + b`` (:func:`unfuse_bias`), so that the bias is added
    in the fused kernel that follows instead of by a pass of its own.
``"cuda-graph"``
    The graph captured in a CUDA graph over static copies of the inputs: each call copies the new
    inputs in and replays; the outputs are static buffers, overwritten by the next call.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.fx.experimental.const_fold import FoldedGraphModule, split_const_subgraphs
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

MODES = ("graph", "inductor", "cuda-graph")


def rng_states(tensors: Iterable = ()) -> dict:
    """The states of torch's CPU generator and of the CUDA generators of the devices of ``tensors``."""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
    return {"cpu": torch.get_rng_state(), **{d: torch.cuda.get_rng_state(d) for d in devices}}


def same_rng_states(a: dict, b: dict) -> bool:
    """Whether two :func:`rng_states` are the same: the same draws were taken since one state."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def preserved_rng(tensors: Iterable = ()):
    """Restore torch's CPU generator, and the CUDA generators of the devices of ``tensors``, on exit."""
    states = rng_states(tensors)
    try:
        yield
    finally:
        torch.set_rng_state(states.pop("cpu"))
        for d, state in states.items():
            torch.cuda.set_rng_state(state, d)


def one_fake_mode():
    """A context in which ``make_fx`` describes every traced value with one fake-tensor mode instead
    of a new one per value (each of which records a Python stack trace): halves the tracing time.
    Internal torch API, so anything but the current behaviour falls back to the default."""
    try:
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode

        return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))
    except Exception:  # a torch without these
        return contextlib.nullcontext()


def trace(fn: Callable, *inputs: torch.Tensor, simplified: bool = True) -> torch.fx.GraphModule:
    """``fn(*inputs)`` as a graph module of ATen operations taking ``inputs`` (positionally, in this
    order) and returning what ``fn`` returns; dead code removed and, with ``simplified``,
    :func:`simplify` applied. Draws nothing from torch's generators. Raises what ``make_fx`` raises
    (data-dependent control flow, an operation it cannot trace)."""
    with preserved_rng(inputs), one_fake_mode():
        graph = make_fx(fn)(*inputs)
    graph.graph.eliminate_dead_code()
    if simplified:
        simplify(graph)
    else:
        graph.recompile()
    return graph


_aten = torch.ops.aten
_IDENTITY_IF_SAME = {_aten.alias.default, _aten.view.default, _aten.expand.default, _aten._unsafe_view.default}
_INVOLUTIONS = {_aten.t.default, _aten.neg.default}  # f(f(a)) = a, exactly
_NEUTRAL = {_aten.add.Tensor: 0, _aten.sub.Tensor: 0, _aten.mul.Tensor: 1, _aten.mul.Scalar: 1, _aten.div.Tensor: 1,
            _aten.pow.Tensor_Scalar: 1}


def _mutated(functions: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes that some in-place operation of the graph writes to (``aten.normal_`` on a fresh tensor, …)."""
    written = set()
    for node in functions:
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            for arg, schema in zip(node.args, node.target._schema.arguments):
                if schema.alias_info is not None and schema.alias_info.is_write:  # a tensor, or a list of them
                    written.update(a for a in (arg if isinstance(arg, (list, tuple)) else [arg]) if isinstance(a, torch.fx.Node))
            for arg in node.kwargs.values():
                if isinstance(arg, torch.fx.Node):
                    written.add(arg)
    return written


def simplify(graph_module: torch.fx.GraphModule) -> None:
    """Drop operations that return their input unchanged (aliases, views and expansions to the same
    shape and strides, + 0, × 1, ^ 1, a transpose or a negation undone by the next: each costs a
    Python call per replay), and turn
    ``ones_like``/``zeros_like`` (the seeds of backward passes) into constants, so that
    :func:`fold_constants` takes the chains that start from them. A tensor that an in-place
    operation writes to is left as it is (a copy made by + 0 stays a copy), so graphs with random
    operations are simplified too."""
    graph = graph_module.graph
    functions = [n for n in graph.nodes if n.op == "call_function"]
    written = _mutated(functions)
    for node in functions:
        value, source = node.meta.get("val"), node.args[0] if node.args else None
        if node.target in _INVOLUTIONS and isinstance(source, torch.fx.Node) and source.target is node.target:
            # t(t(a)), neg(neg(a)): a itself where the layout is a's and nothing writes to any of them
            original = source.args[0]
            before = original.meta.get("val") if isinstance(original, torch.fx.Node) else None
            if (isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor) and value.shape == before.shape
                    and value.dtype == before.dtype and value.stride() == before.stride()
                    and not {node, source, original} & written):
                node.replace_all_uses_with(original)
                graph.erase_node(node)
                continue
        if node.target in (_aten.ones_like.default, _aten.zeros_like.default) and isinstance(value, torch.Tensor):
            if node in written:
                continue
            name = f"_seed{len(graph_module._buffers)}"
            fill = torch.ones if node.target is _aten.ones_like.default else torch.zeros
            graph_module.register_buffer(name, fill(value.shape, dtype=value.dtype, device=value.device))
            with graph.inserting_before(node):
                node.replace_all_uses_with(graph.get_attr(name))
            graph.erase_node(node)
            continue
        before = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        same = (isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor) and value.shape == before.shape
                and value.dtype == before.dtype and value.stride() == before.stride())
        if not same:
            continue
        if node.target in _IDENTITY_IF_SAME:  # the same memory, the same layout: a write through either is the same write
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            continue
        neutral = node.target in _NEUTRAL and len(node.args) == 2 and not node.kwargs and \
            isinstance(node.args[1], (int, float)) and node.args[1] == _NEUTRAL[node.target]
        if neutral and node not in written and source not in written:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
    _merge_repeats(graph, written)
    graph.eliminate_dead_code()
    graph_module.recompile()


def _merge_repeats(graph: torch.fx.Graph, written: set[torch.fx.Node]) -> None:
    """Compute once what the graph computes twice: a pure operation (not random, writing nothing,
    its result written by nothing) called again on the same arguments is replaced by the first call."""
    first: dict = {}
    for node in list(graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or node in written \
                or target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            continue
        try:
            key = (target, _hashable(node.args), _hashable(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_hashable(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, (bool, int, float)):  # 2 and 2.0 are the same key otherwise, not the same operation
        return (type(value).__name__, value)
    if isinstance(value, torch.Tensor):
        raise TypeError("a tensor argument: compared by value, not merged")
    return value


def fold_constants(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph with every part that depends on no input computed once, on its first call, and
    kept (``torch.fx.experimental.const_fold``). Random operations, in-place writes and the
    tensors they write to are never folded, nor is anything computed from them: each call draws
    afresh."""
    written = _mutated([n for n in graph_module.graph.nodes if n.op == "call_function"])

    def per_call(node: torch.fx.Node) -> bool:
        target = node.target
        return node in written or (isinstance(target, torch._ops.OpOverload) and (
            target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # const_fold warns about the attributes it creates
        return split_const_subgraphs(graph_module, skip_folding_node_fn=per_call)


def refold(graph_module: torch.fx.GraphModule) -> None:
    """Recompute, in place, the parts of a :func:`fold_constants` graph that depend on no input,
    after tensors they read (data, parameters) changed in place; nothing if it has not run yet."""
    subgraph = getattr(graph_module, "const_subgraph_module", None)
    if subgraph is None or not getattr(graph_module, "has_folding_been_run", False):
        return
    folded = getattr(graph_module, graph_module.fx_const_folded_attrs_name)
    values = subgraph()
    with torch.no_grad():
        for kept, value in zip(folded if isinstance(values, tuple) else [folded], values if isinstance(values, tuple) else [values]):
            kept.copy_(value)


def replay(graph: torch.fx.GraphModule, mode: str, inputs: Sequence[torch.Tensor], live: Sequence[torch.Tensor] = (),
           what: str = "graph", eager_noise: bool = False) -> Callable[..., Any]:
    """A function of the inputs that replays ``graph`` in ``mode`` (see the module docstring).

    ``inputs`` are example inputs of the signature (compiling runs on them; a CUDA graph copies
    them into its static buffers); ``live`` are further inputs passed on every call as they are
    (the trained parameters, updated in place by the optimizer): the graph takes
    ``(*inputs, *live)``, the returned function ``(*inputs)``. Nothing is drawn from torch's
    generators on the way. ``what`` names the graph in the fallback warning. ``eager_noise``: in
    mode ``"inductor"``, draw the random operations with torch's generator as the eager function
    does (inductor's ``fallback_random``) rather than with inductor's own stream."""
    if mode not in MODES:
        raise ValueError(f"unknown replay mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "cuda-graph":
        with preserved_rng([*inputs, *live]):
            return cuda_graph(graph, inputs, live)
    run = graph
    if mode == "inductor":
        with preserved_rng([*inputs, *live]):
            run = compiled(graph, [*inputs, *live], what, eager_noise)
    if not live:
        return run
    live = list(live)
    return lambda *new: run(*new, *live)


def unfuse_bias(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of the graph with every ``addmm(b, A, B)`` (a linear layer: b + A B) written as
    ``mm(A, B) + b``. The same values, up to the order of a float sum. For inductor on the CPU:
    its ``addmm`` first copies the broadcast bias into the whole output, one more pass over an
    (N, out) array before the matrix product adds to it, where ``mm`` writes the product alone
    and the addition fuses into the elementwise kernel that reads it next (an activation, a
    log-density). Inductor does this itself on GPUs only; on a 5000 × 784 decoder output this
    pass took about 15 % of the importance-sampling pass on one CPU thread. The copy shares the
    original's attributes (constants stay references); a graph of :func:`fold_constants`, which
    computes its folded part on its first call, is returned as it is."""
    if isinstance(graph_module, FoldedGraphModule):
        return graph_module
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(graph_module.graph, {}))
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            bias, a, b = node.args
            with graph.inserting_before(node):
                product = graph.call_function(torch.ops.aten.mm.default, (a, b))
                total = graph.call_function(torch.ops.aten.add.Tensor, (product, bias))
            total.meta = dict(node.meta)
            node.replace_all_uses_with(total)
            graph.erase_node(node)
    return torch.fx.GraphModule(graph_module, graph)


def compiled(graph: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], what: str = "graph",
             eager_noise: bool = False) -> Callable[..., Any]:
    """``graph`` compiled by inductor now, for ``inputs`` of this signature; the plain graph where
    compiling fails, after a warning. ``eager_noise``: random operations drawn with torch's
    generator, in the eager order (``fallback_random``).

    The graph is handed to inductor directly (``torch._inductor.compile``, made for graphs traced
    without TorchDynamo), not through ``torch.compile``: a traced graph has nothing for TorchDynamo
    to guard, and its guards on every input cost about 0.1 ms per call, measured on the training step."""
    from torch._inductor import compile as inductor_compile

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU machines
    on_cpu = all(t.device.type == "cpu" for t in inputs if isinstance(t, torch.Tensor))
    flat, spec = flat_outputs(unfuse_bias(graph) if on_cpu else graph)
    try:
        with torch.no_grad():
            run = inductor_compile(flat, list(inputs), {"fallback_random": True} if eager_noise else None)
    except Exception as e:
        message = str(e).strip()
        log.warning("inductor failed to compile the %s, which is replayed uncompiled instead: %s: %s",
                    what, type(e).__name__, message.splitlines()[0] if message else "")
        return graph
    return lambda *args: pytree.tree_unflatten(list(run(*args)), spec)


def flat_outputs(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, pytree.TreeSpec]:
    """A copy of the graph that returns its outputs as one flat tuple of tensors (what inductor
    compiles), and the structure that :func:`torch.utils._pytree.tree_unflatten` rebuilds them with
    (lists, tuples, and None where a gradient is missing). Shares the original's attributes."""
    graph = torch.fx.Graph()
    outputs = graph.graph_copy(graph_module.graph, {})
    leaves, spec = pytree.tree_flatten(outputs)
    graph.output(tuple(leaves))
    return torch.fx.GraphModule(graph_module, graph), spec


def cuda_graph(graph: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], live: Sequence[torch.Tensor] = ()) -> Callable[..., Any]:
    """``graph`` captured in a CUDA graph over static copies of ``inputs`` and the ``live`` tensors
    (updated in place, so their addresses stay put). Returns a function that copies new inputs into
    the static buffers, replays, and returns the static outputs."""
    static = [t.detach().clone() for t in inputs]
    live = list(live)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up: library handles and workspaces are made outside the capture
            graph(*static, *live)
    torch.cuda.current_stream().wait_stream(side)
    captured = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(captured):
        outputs = graph(*static, *live)

    def run(*new_inputs):
        for buffer, value in zip(static, new_inputs):
            buffer.copy_(value, non_blocking=True)
        captured.replay()
        return outputs

    return run


__all__ = ["MODES", "compiled", "cuda_graph", "flat_outputs", "fold_constants", "one_fake_mode", "preserved_rng", "refold", "replay",
           "rng_states", "same_rng_states", "simplify", "trace", "unfuse_bias"]
