"""Permutation specs: which state_dict axes carry which hidden-unit permutation.

A `PermutationSpec` records, for every key of a model's state_dict, which permutation (if any)
acts on each of its axes (`axes_to_perm`), and the inverse map (`perm_to_axes`). PyTorch layouts:
``Linear.weight`` is (out, in), ``Conv2d.weight`` is (out, in, kh, kw); a permutation of a
layer's units permutes axis 0 of its weight, bias and norm tensors (BatchNorm's running
statistics included) and axis 1 of every weight that reads them. The output classes are never
permuted. Where a conv's output is flattened into a linear layer, the linear weight's input axis
holds ``C * H * W`` entries; the channel permutation acts on blocks of ``H * W`` contiguous
entries (`blocks`).

Two ways to get a spec, which must agree (tests check it for every built-in model):

- `builtin_spec(model)`: hand-written for the library's ``mlp``, ``vgg`` and ``resnet20``.
- `spec_for(model, example_input)`: derived from a `torch.fx` trace of any model made of
  Linear / Conv2d / BatchNorm / LayerNorm, activations, pooling, flatten and elementwise ops.
  A residual add unifies the permutations of its inputs (union-find); whatever reaches the
  model's output, or comes from its input, stays unpermuted; an op it cannot reason about gives a
  `ConfigError` naming the graph node.

Permutation names are canonical: ``P_<module>`` after the first module (in state_dict order)
whose output units the permutation orders, so specs built either way compare equal with ``==``.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from basinmerge.adapter import Inputs
from basinmerge.errors import ConfigError
from basinmerge.models import MLP, VGG, ChannelLayerNorm, ResNet20
from basinmerge.state import module_mode, param_keys

Axis = tuple[str, int]  # (state_dict key, axis)


@dataclass(frozen=True)
class PermutationSpec:
    """Which permutation acts on which axis of which state_dict key.

    - ``perm_to_axes[p]``: the (key, axis) pairs permuted by ``p``, in state_dict order.
    - ``axes_to_perm[key]``: one entry per axis of ``key``: a permutation name or None. Every key
      of the state_dict is listed (unpermuted ones with all-None entries).
    - ``sizes[p]``: the number of units ``p`` permutes.
    - ``blocks[(key, axis)]``: for an axis holding ``size * block`` entries (a linear layer
      reading a flattened conv output), the block length; absent means 1.
    - ``shapes[key]``: the tensor shapes the spec was built for.
    - ``heads[p] = (group, d)`` (transformers): ``p`` permutes ``H * d`` units that form H
      attention heads of d contiguous units; it may only move whole heads (any order of the d
      units inside each), and every permutation of one ``group`` moves the heads the same way
      (a head's query/key dims and its value/output dims). Empty for other models.
    - ``derived[p] = (q, r, ...)``: ``p`` is not free but the concatenation of ``q``, ``r``, ...
      (each offset by the sizes before it), e.g. a fused QKV projection's output axis
      ``(P_qk, P_qk, P_vo)``. Permutation dicts still hold an entry for ``p``
      (`permute.check_permutation` fills it in).
    """

    perm_to_axes: dict[str, list[Axis]]
    axes_to_perm: dict[str, tuple[str | None, ...]]
    sizes: dict[str, int]
    blocks: dict[Axis, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    heads: dict[str, tuple[str, int]] = field(default_factory=dict)
    derived: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def perms(self) -> list[str]:
        return list(self.perm_to_axes)

    @property
    def free_perms(self) -> list[str]:
        """The permutations that are chosen freely (all but the `derived` ones)."""
        return [p for p in self.sizes if p not in self.derived]

    @property
    def structured(self) -> bool:
        """True when some permutation is head-structured or derived (a transformer spec):
        plain one-LAP-per-permutation matching does not apply."""
        return bool(self.heads or self.derived)

    def block(self, key: str, axis: int) -> int:
        return self.blocks.get((key, axis), 1)

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[Axis]], shapes: Mapping[str, Sequence[int]],
                    blocks: Mapping[Axis, int] | None = None) -> PermutationSpec:
        """Build a spec from groups of (key, axis) pairs that share one permutation.

        `shapes` lists every state_dict key (in state_dict order) with its shape. Names are
        canonical (see the module docstring); sizes are checked for consistency."""
        dims = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        blocks = {ax: int(b) for ax, b in (blocks or {}).items() if int(b) != 1}
        order = {k: i for i, k in enumerate(dims)}
        named: list[tuple[tuple[int, int], str, list[Axis], int]] = []
        seen: set[Axis] = set()
        for group in groups:
            members = sorted(set(group), key=lambda ax: (order.get(ax[0], len(order)), ax[1]))
            if members:
                size = _group_size(members, dims, blocks, seen)
                named.append(((order[members[0][0]], members[0][1]), _canonical_name(members),
                              members, size))
        named.sort(key=lambda t: t[0])
        perm_to_axes: dict[str, list[Axis]] = {}
        sizes: dict[str, int] = {}
        for _, name, members, size in named:
            name = _unused_name(name, perm_to_axes)
            perm_to_axes[name] = members
            sizes[name] = size
        lookup = {ax: p for p, axes in perm_to_axes.items() for ax in axes}
        axes_to_perm = {key: tuple(lookup.get((key, a)) for a in range(len(shape)))
                        for key, shape in dims.items()}
        used_blocks = {ax: b for ax, b in blocks.items() if ax in lookup}
        return cls(perm_to_axes, axes_to_perm, sizes, used_blocks, dims)

    def summary(self) -> list[list[Any]]:
        """Rows (permutation, units, number of axes, first keys) for printing."""
        return [[p, self.sizes[p], len(axes), ", ".join(f"{k}[{a}]" for k, a in axes[:3])
                 + (" ..." if len(axes) > 3 else "")] for p, axes in self.perm_to_axes.items()]


def _group_size(members: Sequence[Axis], dims: Mapping[str, tuple[int, ...]],
                blocks: Mapping[Axis, int], seen: set[Axis]) -> int:
    """The number of units one group permutes, after checking each of its axes: the key
    exists, has the axis, is in no other group (`seen`, filled here), holds a whole number of
    blocks, and every axis holds the same number of units."""
    size: int | None = None
    for key, axis in members:
        if key not in dims:
            raise ConfigError(f"permutation spec names key '{key}', which the model lacks")
        if not 0 <= axis < len(dims[key]):
            raise ConfigError(f"permutation spec: key '{key}' has no axis {axis} "
                              f"(shape {dims[key]})")
        if (key, axis) in seen:
            raise ConfigError(f"permutation spec: axis {axis} of '{key}' is in two permutations")
        seen.add((key, axis))
        b = blocks.get((key, axis), 1)
        n, rem = divmod(dims[key][axis], b)
        if rem:
            raise ConfigError(f"permutation spec: axis {axis} of '{key}' (size "
                              f"{dims[key][axis]}) is not a multiple of its block {b}")
        if size is None:
            size = n
        elif n != size:
            raise ConfigError(f"permutation spec: axis {axis} of '{key}' has {n} units but "
                              f"'{members[0][0]}' axis {members[0][1]} has {size}")
    assert size is not None  # members is not empty
    return int(size)


def _canonical_name(members: Sequence[Axis]) -> str:
    """``P_<module>`` after the first member that is an output axis (axis 0), else the first."""
    outs = [k for k, a in members if a == 0]
    anchor = outs[0] if outs else members[0][0]
    return "P_" + (anchor.rsplit(".", 1)[0] if "." in anchor else anchor)


def _unused_name(name: str, taken: Mapping[str, Any]) -> str:
    """`name`, or ``name#2``, ``name#3``, ... when it is taken."""
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}#{i}"
    return name


def parameter_keys(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the trainable tensors (see `basinmerge.state.param_keys`, the one place)."""
    return param_keys(model_or_state)


# --------------------------------------------------------------------------- hand-written specs


def _norm_axes(state: Mapping[str, torch.Tensor], prefix: str) -> list[Axis]:
    """Axis 0 of every per-channel tensor of the norm module at `prefix` (none for Identity)."""
    return [(f"{prefix}.{n}", 0) for n in ("weight", "bias", "running_mean", "running_var")
            if f"{prefix}.{n}" in state]


def _out_axes(state: Mapping[str, torch.Tensor], prefix: str) -> list[Axis]:
    """Axis 0 of a linear/conv layer's weight and (if any) bias."""
    return [(f"{prefix}.weight", 0)] + ([(f"{prefix}.bias", 0)] if f"{prefix}.bias" in state else [])


def _chain_groups(state: Mapping[str, torch.Tensor], layers: str, n: int,
                  last_reader: str) -> list[list[Axis]]:
    """One group per layer of a chain ``<layers>.0 .. <layers>.<n-1>``, each followed by
    ``norms.i``: the layer's outputs, its norm and the next layer's inputs (`last_reader` reads
    the last layer)."""
    groups = []
    for i in range(n):
        reader = f"{layers}.{i + 1}" if i + 1 < n else last_reader
        groups.append(_out_axes(state, f"{layers}.{i}") + _norm_axes(state, f"norms.{i}")
                      + [(f"{reader}.weight", 1)])
    return groups


def _mlp_groups(model: MLP, state) -> tuple[list[list[Axis]], dict]:
    return _chain_groups(state, "layers", len(model.layers), "head"), {}


def _vgg_groups(model: VGG, state) -> tuple[list[list[Axis]], dict]:
    n = len(model.convs)
    groups = _chain_groups(state, "convs", n, "fc")
    channels = state[f"convs.{n - 1}.weight"].shape[0]  # the last conv's out_channels
    spatial = model.fc.in_features // channels
    groups.append(_out_axes(state, "fc") + [("head.weight", 1)])
    return groups, {("fc.weight", 1): spatial}


def _resnet_groups(model: ResNet20, state) -> tuple[list[list[Axis]], dict]:
    stream = _out_axes(state, "stem") + _norm_axes(state, "stem_norm")
    groups = []
    for s, stage in enumerate((model.layer1, model.layer2, model.layer3)):
        for b, block in enumerate(stage):
            p = f"layer{s + 1}.{b}"
            has_proj = isinstance(block.shortcut, nn.Sequential)
            # Reading the incoming stream: conv1 (and the projection shortcut).
            stream.append((f"{p}.conv1.weight", 1))
            if has_proj:
                stream.append((f"{p}.shortcut.0.weight", 1))
                groups.append(stream)  # the incoming stream ends here; a new one starts
                stream = _out_axes(state, f"{p}.shortcut.0") + _norm_axes(state, f"{p}.shortcut.1")
            # Block-internal channels.
            groups.append(_out_axes(state, f"{p}.conv1") + _norm_axes(state, f"{p}.norm1")
                          + [(f"{p}.conv2.weight", 1)])
            # Writing to the (outgoing) stream: conv2 and its norm.
            stream += _out_axes(state, f"{p}.conv2") + _norm_axes(state, f"{p}.norm2")
    stream.append(("fc.weight", 1))  # the last stream is permuted through pooling into fc
    groups.append(stream)
    return groups, {}


_GroupsFn = Callable[[Any, Any], tuple[list[list[Axis]], dict]]
_BUILTIN: tuple[tuple[type[nn.Module], _GroupsFn], ...] = (
    (MLP, _mlp_groups), (VGG, _vgg_groups), (ResNet20, _resnet_groups))


def builtin_spec(model: nn.Module) -> PermutationSpec:
    """The hand-written spec of a library model (``mlp``, ``vgg``, ``resnet20``; any norm)."""
    state = model.state_dict()
    for cls, fn in _BUILTIN:
        if type(model) is cls:
            groups, blocks = fn(model, state)
            return PermutationSpec.from_groups(groups, {k: v.shape for k, v in state.items()}, blocks)
    raise ConfigError(f"no hand-written permutation spec for {type(model).__name__}; "
                      "use spec_for(model, example_input)")


def has_builtin_spec(model: nn.Module) -> bool:
    return any(type(model) is cls for cls, _ in _BUILTIN)


# --------------------------------------------------------------------------- traced specs

# Modules whose output carries the input's units unchanged (no parameters).
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
                 nn.Softplus, nn.Hardswish, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d,
                 nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid,
                   torch.tanh, F.tanh, F.leaky_relu, F.elu, F.softplus, F.hardswish, F.mish,
                   F.dropout, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, torch.clone}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach"}
# Elementwise binary ops: the units of two tensor operands must line up.
_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
           operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}


class _LeafTracer(fx.Tracer):
    """torch.nn modules and the library's ChannelLayerNorm are leaves; containers are traced."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.modules.batchnorm._BatchNorm
                      | nn.LayerNorm | ChannelLayerNorm):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """An fx graph of `model` with tensor shapes (``node.meta['tensor_meta']``) from one forward
    pass of `example_input` (in eval mode, without gradients)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # fx raises many kinds for data-dependent control flow
        raise ConfigError(f"cannot trace {type(model).__name__} with torch.fx: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (for a "
                          "transformer use basinmerge.align.transformer_spec(model, example, "
                          "num_heads=...), or pass spec=)") from e
    gm = fx.GraphModule(model, graph)
    param = next(iter(model.parameters()), None)
    if param is not None:
        example_input = example_input.to(param.device)
    try:
        with torch.no_grad(), module_mode(gm, False):
            ShapeProp(gm).propagate(example_input)
    except Exception as e:
        raise ConfigError(f"running {type(model).__name__} on the example input failed: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return gm


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


_FIXED = ("fixed",)


@dataclass
class _Value:
    """A tensor in the graph: the union-find element of its units, which axis holds them, and
    how many contiguous entries each unit spans on that axis (after a flatten)."""

    elem: Any
    axis: int
    block: int
    ndim: int


@dataclass
class TracedUnits:
    """What a trace found: the spec, and for each hidden linear/conv layer the module right
    after it when that is a norm (REPAIR folds its correction there)."""

    spec: PermutationSpec
    producers: list[str]  # linear/conv modules whose outputs are permuted units, in graph order
    following_norm: dict[str, str | None]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _SpecBuilder:
    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.model = model
        self.gm = gm
        self.modules = dict(model.named_modules())
        self.state = model.state_dict()
        self.uf = _UnionFind()
        self.uf.find(_FIXED)
        self.values: dict[str, _Value | None] = {}
        self.param_axes: list[Axis] = []
        self.blocks: dict[Axis, int] = {}
        self.producers: list[tuple[str, str]] = []  # (module name, node name)

    # ---- helpers
    def _err(self, node: fx.Node, why: str) -> ConfigError:
        return ConfigError(f"spec_for: cannot reason about node '{node.name}' "
                           f"({node.op} {self._target_name(node)}): {why}")

    @staticmethod
    def _target_name(node: fx.Node) -> str:
        t = node.target
        return t if isinstance(t, str) else getattr(t, "__name__", repr(t))

    def _value(self, arg: fx.node.Argument, node: fx.Node) -> _Value | None:
        if isinstance(arg, fx.Node):
            if arg.name not in self.values:
                raise self._err(node, f"input '{arg.name}' was not analysed")
            return self.values[arg.name]
        return None

    def _tensor_value(self, arg: fx.node.Argument, node: fx.Node) -> _Value:
        """`_value` of an operand that must be a tensor."""
        x = self._value(arg, node)
        if x is None:
            raise self._err(node, "its input is not a tensor")
        return x

    def _known_shape(self, node: fx.Node, arg: fx.node.Argument) -> tuple[int, ...]:
        """The shape of `arg` (a node of the graph with a tensor output)."""
        shape = _shape(arg) if isinstance(arg, fx.Node) else None
        if shape is None:
            raise self._err(node, "unknown input shape")
        return shape

    def _int_arg(self, node: fx.Node, value: fx.node.Argument) -> int:
        if not isinstance(value, int):
            raise self._err(node, f"the argument {value!r} is not a constant integer")
        return int(value)

    def _sequence(self, node: fx.Node, value: fx.node.Argument) -> Sequence[fx.node.Argument]:
        if not isinstance(value, list | tuple):
            raise self._err(node, f"the argument {value!r} is not a list of integers")
        return value

    def _tensor_args(self, node: fx.Node) -> list[_Value]:
        vals = [self._value(a, node) for a in list(node.args) + list(node.kwargs.values())]
        return [v for v in vals if v is not None]

    def _bind(self, key: str, axis: int, elem, block: int = 1) -> None:
        self.param_axes.append((key, axis))
        self.uf.union((key, axis), elem)
        if block != 1:
            self.blocks[(key, axis)] = block

    def _new(self, node: fx.Node, axis: int) -> _Value:
        shape = self._known_shape(node, node)
        return _Value(("v", node.name), axis % len(shape), 1, len(shape))

    # ---- node kinds
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = _shape(node)
                self.values[node.name] = (_Value(_FIXED, 1 if len(shape) > 1 else 0, 1, len(shape))
                                          if shape is not None else None)
            elif node.op == "get_attr":
                shape = _shape(node)
                self.values[node.name] = _Value(_FIXED, 0, 1, len(shape)) if shape else None
            elif node.op == "output":
                for v in self._tensor_args(node):
                    self.uf.union(v.elem, _FIXED)
            elif node.op == "call_module":
                self.values[node.name] = self._module(node)
            elif node.op in ("call_function", "call_method"):
                self.values[node.name] = self._function(node)
            else:  # pragma: no cover - fx has no other ops
                raise self._err(node, "unknown node kind")

    def _single_input(self, node: fx.Node) -> _Value:
        vals = self._tensor_args(node)
        if len(vals) != 1:
            raise self._err(node, f"expected one tensor input, got {len(vals)}")
        return vals[0]

    def _module(self, node: fx.Node) -> _Value | None:
        """A leaf module: its kind's handler (`_MODULE_KINDS`, looked up along the module's
        class hierarchy, most specific class first)."""
        name = str(node.target)
        m = self.modules[name]
        if _shape(node) is None:
            raise self._err(node, "its output is not a tensor")
        x = self._single_input(node)
        handler = next((_MODULE_KINDS[k] for k in type(m).__mro__ if k in _MODULE_KINDS), None)
        if handler is None:
            raise self._err(node, f"module type {type(m).__name__} is not supported")
        return handler(self, node, name, m, x)

    def _produce(self, node: fx.Node, name: str, m: nn.Module, x: _Value, axis: int) -> _Value:
        """A linear/conv layer reading units `x` and producing new units on `axis`."""
        self._bind(f"{name}.weight", 1, x.elem, x.block)
        out = self._new(node, axis)
        self._bind(f"{name}.weight", 0, out.elem)
        if getattr(m, "bias", None) is not None:
            self._bind(f"{name}.bias", 0, out.elem)
        self.producers.append((name, node.name))
        return out

    def _linear(self, node: fx.Node, name: str, m: nn.Module, x: _Value) -> _Value:
        if x.axis != x.ndim - 1:
            raise self._err(node, "the input's units are not on its last axis")
        return self._produce(node, name, m, x, -1)

    def _conv(self, node: fx.Node, name: str, m: nn.Module, x: _Value) -> _Value:
        assert isinstance(m, nn.Conv1d | nn.Conv2d)
        if m.groups != 1:
            raise self._err(node, f"grouped convolution (groups={m.groups}) is not supported")
        if x.axis != 1 or x.block != 1:
            raise self._err(node, "the input's units are not on the channel axis")
        return self._produce(node, name, m, x, 1)

    def _norm(self, node: fx.Node, name: str, m: nn.Module, x: _Value) -> _Value:
        """BatchNorm / ChannelLayerNorm (channel axis) or LayerNorm (last axis): its
        per-unit tensors follow the input's units."""
        channel_axis = x.ndim - 1 if (isinstance(m, nn.LayerNorm)
                                      and not isinstance(m, ChannelLayerNorm)) else 1
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
            raise self._err(node, "LayerNorm over several axes is not supported")
        if x.axis != channel_axis or x.block != 1:
            raise self._err(node, "it normalizes an axis that does not hold the input's units")
        for key in m.state_dict():
            full = f"{name}.{key}"
            if self.state[full].dim() == 1:
                self._bind(full, 0, x.elem)
        return x

    def _flatten_module(self, node: fx.Node, name: str, m: nn.Module, x: _Value) -> _Value:
        assert isinstance(m, nn.Flatten)
        return self._flatten(node, x, m.start_dim, m.end_dim)

    def _pass_module(self, node: fx.Node, name: str, m: nn.Module, x: _Value) -> _Value:
        return self._pass(node, x)

    def _pass(self, node: fx.Node, x: _Value) -> _Value:
        shape = _shape(node)
        if shape is None or len(shape) != x.ndim:
            raise self._err(node, "it changes the number of axes")
        return x

    def _flatten(self, node: fx.Node, x: _Value, start: int, end: int) -> _Value:
        in_shape = self._known_shape(node, node.args[0])
        nd = len(in_shape)
        start, end = start % nd, end % nd
        if x.axis < start:
            return _Value(x.elem, x.axis, x.block, nd - (end - start))
        if x.axis > end:
            return _Value(x.elem, x.axis - (end - start), x.block, nd - (end - start))
        if x.elem != _FIXED and x.axis != start:
            raise self._err(node, "flattening puts other axes before the units (strided permutation)")
        block = x.block * math.prod(in_shape[x.axis + 1:end + 1])
        return _Value(x.elem, start, block, nd - (end - start))

    def _function(self, node: fx.Node) -> _Value | None:
        """A function or method call: its kind's handler (`_FUNCTION_KINDS` by function,
        `_METHOD_KINDS` by method name); calls without a tensor result give None."""
        shape = _shape(node)
        if shape is None:  # sizes, shapes and other non-tensor values
            return None
        kinds: Mapping[Any, _Handler] = (_METHOD_KINDS if node.op == "call_method"
                                         else _FUNCTION_KINDS)
        handler = kinds.get(node.target)
        if handler is None:
            raise self._err(node, "operation not supported (supported: linear, conv, batch/layer "
                                  "norm, activations, pooling, flatten, elementwise "
                                  "add/sub/mul/div)")
        return handler(self, node, shape)

    def _pass_function(self, node: fx.Node, shape: tuple[int, ...]) -> _Value:
        return self._pass(node, self._single_input(node))

    def _pass_method(self, node: fx.Node, shape: tuple[int, ...]) -> _Value:
        return self._pass(node, self._tensor_value(node.args[0], node))

    def _binary(self, node: fx.Node, shape: tuple[int, ...]) -> _Value:
        """An elementwise op: the units of its tensor operands are unified (an operand from
        the input or a constant fixes the others)."""
        vals = self._tensor_args(node)
        if not vals:
            raise self._err(node, "no tensor operand")
        out = vals[0]
        for v in vals[1:]:
            if v.elem == _FIXED or out.elem == _FIXED:
                self.uf.union(v.elem, _FIXED)
                self.uf.union(out.elem, _FIXED)
                out = v if out.elem == _FIXED and v.ndim == len(shape) else out
                continue
            if (v.axis, v.block, v.ndim) != (out.axis, out.block, out.ndim):
                raise self._err(node, "its operands hold their units on different axes")
            self.uf.union(v.elem, out.elem)
        if out.ndim != len(shape):
            raise self._err(node, "broadcasting changes the number of axes")
        return out

    def _flatten_call(self, node: fx.Node, shape: tuple[int, ...]) -> _Value:
        x = self._tensor_value(node.args[0], node)
        args = list(node.args[1:])
        start = self._int_arg(node, node.kwargs.get("start_dim", args[0] if args else 0))
        end = self._int_arg(node, node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1))
        return self._flatten(node, x, start, end)

    def _reshape(self, node: fx.Node, shape: tuple[int, ...]) -> _Value:
        """``view`` / ``reshape``: to the same shape, or flattening all but the batch axis."""
        x = self._tensor_value(node.args[0], node)
        in_shape = self._known_shape(node, node.args[0])
        if tuple(shape) == tuple(in_shape):
            return x
        if len(in_shape) >= 2 and tuple(shape) == (in_shape[0], math.prod(in_shape[1:])):
            return self._flatten(node, x, 1, -1)
        raise self._err(node, f"reshape from {tuple(in_shape)} to {tuple(shape)}")

    def _reduce(self, node: fx.Node, shape: tuple[int, ...]) -> _Value:
        """mean / sum / amax over given axes, none of which may hold permuted units."""
        x = self._tensor_value(node.args[0], node)
        dim_arg = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dim_arg is None:
            raise self._err(node, "a full reduction mixes the units")
        dims = [self._int_arg(node, d) % x.ndim
                for d in ([dim_arg] if isinstance(dim_arg, int) else self._sequence(node, dim_arg))]
        if x.axis in dims and x.elem != _FIXED:
            raise self._err(node, "it reduces over the units' axis")
        keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        axis = x.axis if keep else x.axis - sum(d < x.axis for d in dims)
        return _Value(x.elem, axis, x.block, len(shape))

    # ---- result
    def result(self) -> TracedUnits:
        fixed = self.uf.find(_FIXED)
        groups: dict[Any, list[Axis]] = {}
        for ax in self.param_axes:
            root = self.uf.find(ax)
            if root != fixed:
                groups.setdefault(root, []).append(ax)
        shapes = {k: v.shape for k, v in self.state.items()}
        spec = PermutationSpec.from_groups(list(groups.values()), shapes, self.blocks)
        users: dict[str, str | None] = {}
        producers = []
        for name, node_name in self.producers:
            if spec.axes_to_perm[f"{name}.weight"][0] is None:
                continue  # output layer
            producers.append(name)
            node = next(n for n in self.gm.graph.nodes if n.name == node_name)
            nxt = list(node.users)
            follow = None
            if len(nxt) == 1 and nxt[0].op == "call_module":
                m = self.modules[str(nxt[0].target)]
                if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
                    follow = str(nxt[0].target)
            users[name] = follow
        return TracedUnits(spec, producers, users)


# The node kinds the tracer reasons about: one handler per kind of leaf module (found along the
# module's class hierarchy), of function and of method name.
_ModuleHandler = Callable[[_SpecBuilder, fx.Node, str, nn.Module, _Value], _Value]
_Handler = Callable[[_SpecBuilder, fx.Node, tuple[int, ...]], _Value]
_MODULE_KINDS: dict[type, _ModuleHandler] = {
    nn.Linear: _SpecBuilder._linear, nn.Conv1d: _SpecBuilder._conv, nn.Conv2d: _SpecBuilder._conv,
    nn.modules.batchnorm._BatchNorm: _SpecBuilder._norm, nn.LayerNorm: _SpecBuilder._norm,
    nn.Flatten: _SpecBuilder._flatten_module,
    **{m: _SpecBuilder._pass_module for m in _PASS_MODULES}}
_FUNCTION_KINDS: dict[Any, _Handler] = {
    **{f: _SpecBuilder._pass_function for f in _PASS_FUNCTIONS},
    **{f: _SpecBuilder._binary for f in _BINARY},
    **{f: _SpecBuilder._reduce for f in _REDUCE},
    torch.flatten: _SpecBuilder._flatten_call}
_METHOD_KINDS: dict[Any, _Handler] = {
    **{m: _SpecBuilder._pass_method for m in _PASS_METHODS},
    **{m: _SpecBuilder._binary for m in _BINARY_METHODS},
    **{m: _SpecBuilder._reduce for m in _REDUCE_METHODS},
    "flatten": _SpecBuilder._flatten_call, "view": _SpecBuilder._reshape,
    "reshape": _SpecBuilder._reshape}


_TRACE_CACHE: OrderedDict[tuple, TracedUnits] = OrderedDict()
_TRACE_CACHE_SIZE = 32


def _trace_key(model: nn.Module, example_input: torch.Tensor) -> tuple:
    """What a trace depends on: the model's class, its module tree with each module's settings
    (`repr`), its tensors' names, shapes and dtypes, and the input's shape past the batch axis."""
    tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items())
    return (type(model), repr(model), tensors, tuple(example_input.shape[1:]), example_input.dtype)


def trace_units(model: nn.Module, example_input: Inputs, *, cache: bool = True) -> TracedUnits:
    """Trace `model` once and derive its spec and its hidden layers (see `TracedUnits`).

    Results are cached within the process per model class, module settings, tensor shapes and
    input shape (a trace costs from a tenth of a second to seconds; the weights' values do not
    matter to it), and a copy is returned. A model whose forward depends on plain attributes
    that its `repr` does not show should pass ``cache=False``."""
    if not isinstance(example_input, torch.Tensor):
        raise ConfigError(f"tracing {type(model).__name__} with torch.fx needs a tensor example "
                          f"input, got {type(example_input).__name__} (pass spec=)")
    key = _trace_key(model, example_input) if cache else None
    if key is not None and key in _TRACE_CACHE:
        _TRACE_CACHE.move_to_end(key)
        return copy.deepcopy(_TRACE_CACHE[key])
    builder = _SpecBuilder(model, trace(model, example_input))
    builder.run()
    units = builder.result()
    if key is not None:
        _TRACE_CACHE[key] = copy.deepcopy(units)
        while len(_TRACE_CACHE) > _TRACE_CACHE_SIZE:
            _TRACE_CACHE.popitem(last=False)
    return units


def spec_for(model: nn.Module, example_input: Inputs) -> PermutationSpec:
    """Derive the permutation spec of `model` from a torch.fx trace (see the module docstring).

    `example_input` is one batch of inputs (two examples suffice); it fixes the shapes needed to
    expand a channel permutation over the spatial block of a flatten. Transformers (which
    torch.fx cannot trace) get `basinmerge.align.transformer.transformer_spec` instead."""
    from basinmerge.align.transformer import is_transformer, transformer_spec

    if is_transformer(model):
        return transformer_spec(model, example_input)
    return trace_units(model, example_input).spec


def resolve_spec(model: nn.Module, example_input: Inputs | None = None,
                 spec: PermutationSpec | None = None) -> PermutationSpec:
    """The spec to use for `model`: `spec` if given, the hand-written one for library models,
    the transformer spec for transformers (`basinmerge.align.transformer`; HF models need no
    example input), else a traced one (which needs `example_input`)."""
    if spec is not None:
        return spec
    if has_builtin_spec(model):
        return builtin_spec(model)
    from basinmerge.align.transformer import is_transformer, transformer_spec

    if is_transformer(model):
        return transformer_spec(model, example_input)
    if example_input is None:
        raise ConfigError(f"{type(model).__name__} has no hand-written permutation spec; pass "
                          "spec= or data so the model can be traced")
    return spec_for(model, example_input)
