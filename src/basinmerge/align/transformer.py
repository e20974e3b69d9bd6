"""Permutation specs for transformers (shared/REFERENCE.md §8), found by structure.

torch.fx cannot trace HF models, so the structure is read from one forward pass instead: hooks
on the layers (Linear, HF ``Conv1D``, Embedding, LayerNorm, Conv2d, ``nn.MultiheadAttention``)
record the order in which they run, what they read and their shapes. Attention modules are the
modules that carry a head count (``num_heads``, ``num_attention_heads``, ``n_head``,
``n_heads``; or `num_heads=` names them). Nothing depends on class or parameter names.

The symmetries (D residual width, H heads of d = D / H, F MLP width):

- one residual-stream permutation ``P_res`` shared by the whole network: columns of every
  embedding, the patch projection's output channels, class token and position embeddings,
  every LayerNorm on the stream, the input side of every Q/K/V, first-MLP and head projection,
  the output side (and bias) of every attention-output and second-MLP projection;
- per attention module two head-structured permutations ``<attn>.qk`` (query and key output
  units) and ``<attn>.vo`` (value output units and the output projection's input units): both
  move whole heads, and the same way (``spec.heads``); inside each head any order;
- a fused projection's output axis (GPT-2 ``c_attn``, ``in_proj_weight``) carries the derived
  permutation ``<attn>.qkv`` = (qk, qk, vo) (``spec.derived``);
- per MLP the F hidden units; a head's hidden layers (BERT pooler, MLM transform) likewise,
  unless a weight tie forces them onto the stream (BERT's MLM decoder is the word embedding).

Reading the run: every layer reads the units most recently written at its input width and
writes new units; a layer that reads branch units (MLP hidden, attention values) and writes the
width of the stream it branched from writes back to that stream (a residual add). LayerNorms
keep the units they read. Tied tensors share their permutations. Units no layer reads (the
logits) stay fixed. The result is checked: a random permutation must leave the outputs on the
example input unchanged, else a `ConfigError` names the model and the way out (``spec=``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from basinmerge.align.spec import Axis, PermutationSpec, _UnionFind
from basinmerge.errors import ConfigError, IncompatibleModelsError

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_FIXED = ("fixed",)


# --------------------------------------------------------------------------- feeding models
# Spec discovery records hidden states of any transformer, headless ones too, so it reads
# ``last_hidden_state`` where `basinmerge.adapter.logits_of` (which methods use) wants logits.


def forward(model: nn.Module, batch: Any) -> Any:
    """Run `model` on one batch: a tensor, or a dict of named inputs (``input_ids``,
    ``attention_mask``, ``pixel_values``)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def output_tensor(out: Any) -> torch.Tensor:
    """The main output tensor: the logits (`basinmerge.adapter.logits_of`), else the
    ``last_hidden_state`` of a headless model's output object."""
    from basinmerge.adapter import logits_of

    hidden = out.get("last_hidden_state") if isinstance(out, Mapping) else \
        getattr(out, "last_hidden_state", None)
    has_logits = (out.get("logits") if isinstance(out, Mapping)
                  else getattr(out, "logits", None)) is not None
    if isinstance(hidden, torch.Tensor) and not has_logits:
        return hidden
    try:
        return logits_of(out)
    except ConfigError:
        raise ConfigError(f"cannot find the output tensor in a {type(out).__name__}") from None


def example_input(model: nn.Module, batch_size: int = 2, length: int = 8) -> Any:
    """A small input for an HF model, built from its config (token ids with an attention mask
    that hides the last token of the second row, or random pixels); None if it has no config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    g = torch.Generator().manual_seed(0)
    image = getattr(cfg, "image_size", None)
    if image is not None and getattr(cfg, "num_channels", None):
        size = image if isinstance(image, int) else tuple(image)
        hw = (size, size) if isinstance(size, int) else size
        return torch.randn(batch_size, cfg.num_channels, *hw, generator=g)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab:
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        length = min(length, positions or length)
        ids = torch.randint(0, vocab, (batch_size, length), generator=g)
        mask = torch.ones(batch_size, length, dtype=torch.long)
        mask[-1, -1] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return None


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """Turn off the fused eval-mode fast path of ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer``, which skips their submodules' forward (and hooks)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def move_batch(batch: Any, device) -> Any:
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch.to(device)


# --------------------------------------------------------------------------- recognizing layers


def is_conv1d(m: nn.Module) -> bool:
    """HF ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    w = getattr(m, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(getattr(m, "nf", None), int)
            and w.shape[1] == m.nf and not isinstance(m, nn.Linear))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def _head_count(m: nn.Module) -> int | None:
    if isinstance(m, nn.MultiheadAttention):
        return int(m.num_heads)
    for a in HEAD_ATTRS:
        v = getattr(m, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def is_transformer(model: nn.Module) -> bool:
    """True when `model` holds attention (an ``nn.MultiheadAttention`` or a module with a head
    count and linear layers) or HF ``Conv1D`` layers: the models `transformer_spec` is for."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) or is_conv1d(m):
            return True
        if m is not model and _head_count(m) and any(_is_linear(c) for c in m.modules()):
            return True
    return False


@dataclass
class _Event:
    name: str
    module: Any  # an nn.Module; typed Any as its attributes (weight, heads) vary by kind
    kind: str  # linear | embed | ln | conv | mha
    inp: int  # id of the input tensor
    attn: str | None  # the attention module the layer belongs to


@dataclass
class _Attention:
    name: str
    heads: int
    width: int = 0
    stream: Any = None
    qkv: list[_Event] = field(default_factory=list)
    fused: bool = False
    out_done: bool = False


def _owners(modules: Mapping[str, nn.Module], attention: Mapping[str, int]) -> dict[str, str | None]:
    """{module name: the innermost attention module strictly containing it, or None}."""
    owner: dict[str, str | None] = {}
    for name in modules:
        parts = name.split(".") if name else []
        prefixes = (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1))  # strict ones
        owner[name] = next((q for q in prefixes if q in attention), None)
    return owner


def _layer_kind(m: nn.Module) -> str | None:
    """What `_record` records a module as: mha | linear | embed | ln | conv, or None."""
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    if _is_linear(m):
        return "linear"
    if isinstance(m, nn.Embedding):
        return "embed"
    if isinstance(m, nn.LayerNorm):
        return "ln"
    if isinstance(m, nn.Conv1d | nn.Conv2d):
        return "conv"
    return None


def _run_example(model: nn.Module, example: Any) -> None:
    """One eval-mode forward pass without gradients (training flags restored); a failure is a
    `ConfigError` naming the model."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), no_fastpath():
            forward(model, example)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"running {type(model).__name__} on the example input failed: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    finally:
        for m, mode in modes:
            m.training = mode


def _record(model: nn.Module, example: Any, attention: Mapping[str, int]) -> list[_Event]:
    """Run `model` once (no gradients) and record the layer calls in order."""
    modules = dict(model.named_modules())
    owner = _owners(modules, attention)
    inside_mha = {n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    events: list[_Event] = []

    def hook(name, m, kind):
        def pre(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            events.append(_Event(name, mod, kind, id(x), owner[name]))
        return m.register_forward_pre_hook(pre, with_kwargs=True)

    handles = [hook(name, m, kind) for name, m in modules.items()
               if not any(name.startswith(p + ".") for p in inside_mha)
               and (kind := _layer_kind(m)) is not None]
    try:
        _run_example(model, example)
    finally:
        for h in handles:
            h.remove()
    return events


class _Builder:
    def __init__(self, model: nn.Module, attention: Mapping[str, int], width: int,
                 roles: list[str] | None = None):
        self.model = model
        self.width = width
        self.roles = roles
        self.guessed = False
        self.state = model.state_dict()
        self.uf = _UnionFind()
        self.axes: list[tuple[Axis, Any]] = []
        self.last: dict[int, Any] = {}  # width -> the units most recently written at that width
        self.widths: dict[Any, int] = {}
        self.source: dict[Any, Any] = {}  # branch units -> the stream they branched from
        self.read: set[Any] = set()
        self.derived: dict[Any, tuple[Any, ...]] = {}
        self.heads: dict[Any, tuple[str, int]] = {}
        self.head_width: dict[Any, int] = {}
        self.units: dict[str, _Attention] = {n: _Attention(n, h) for n, h in attention.items()}
        self.pending: _Attention | None = None
        self.counter = 0

    def new(self, tag: str) -> Any:
        self.counter += 1
        return (tag, self.counter)

    def tag(self, key: str, axis: int, elem: Any) -> None:
        if key in self.state:
            self.axes.append(((key, axis), elem))

    def reads(self, width: int, who: str) -> Any:
        if width not in self.last:
            raise ConfigError(f"transformer spec: layer '{who}' reads {width} units that no earlier "
                              "layer writes (unsupported architecture; pass spec=)")
        elem = self.last[width]
        self.read.add(self.uf.find(elem))
        return elem

    # ---- events
    def embed(self, ev: _Event, width: int) -> None:
        m = ev.module
        if m.embedding_dim != width:
            raise ConfigError(f"transformer spec: embedding '{ev.name}' has width {m.embedding_dim}, "
                              f"the residual stream {width} (factorized embeddings are not "
                              "supported; pass spec=)")
        self.tag(f"{ev.name}.weight", 1, "res")
        self._set(width, "res")

    def conv(self, ev: _Event, width: int) -> None:
        m = ev.module
        if m.out_channels != width:
            raise ConfigError(f"transformer spec: convolution '{ev.name}' writes {m.out_channels} "
                              f"channels, the residual stream has {width} (pass spec=)")
        self.tag(f"{ev.name}.weight", 0, "res")
        self.tag(f"{ev.name}.bias", 0, "res")
        self._set(width, "res")

    def layernorm(self, ev: _Event) -> None:
        shape = tuple(ev.module.normalized_shape)
        if len(shape) != 1:
            raise ConfigError(f"transformer spec: LayerNorm '{ev.name}' normalizes {shape}; only "
                              "the last dimension is supported (pass spec=)")
        elem = self.reads(shape[0], ev.name)
        self.tag(f"{ev.name}.weight", 0, elem)
        self.tag(f"{ev.name}.bias", 0, elem)

    def _head_units(self, unit: _Attention, width: int, who: str) -> tuple[Any, Any]:
        if width % unit.heads:
            raise ConfigError(f"transformer spec: attention '{unit.name}' has {unit.heads} heads, "
                              f"which do not divide its width {width}")
        qk, vo = ("qk", unit.name), ("vo", unit.name)
        d = width // unit.heads
        for e in (qk, vo):
            self.heads[e] = (unit.name, d)
            self.head_width[e] = width
        unit.width = width
        return qk, vo

    def mha(self, ev: _Event) -> None:
        m = ev.module
        if not m._qkv_same_embed_dim or m.bias_k is not None:
            raise ConfigError(f"transformer spec: MultiheadAttention '{ev.name}' has separate "
                              "kdim/vdim or add_bias_kv (unsupported; pass spec=)")
        e = m.embed_dim
        unit = _Attention(ev.name, m.num_heads)
        stream = self.reads(e, ev.name)
        qk, vo = self._head_units(unit, e, ev.name)
        fused = ("qkv", ev.name)
        self.derived[fused] = (qk, qk, vo)
        self.tag(f"{ev.name}.in_proj_weight", 1, stream)
        self.tag(f"{ev.name}.in_proj_weight", 0, fused)
        self.tag(f"{ev.name}.in_proj_bias", 0, fused)
        self.tag(f"{ev.name}.out_proj.weight", 1, vo)
        self.tag(f"{ev.name}.out_proj.weight", 0, stream)
        self.tag(f"{ev.name}.out_proj.bias", 0, stream)
        self._set(e, stream)

    def _shape(self, ev: _Event) -> tuple[int, int, int, int]:
        """(in features, out features, weight's in axis, weight's out axis)."""
        w = ev.module.weight
        if is_conv1d(ev.module):
            return int(w.shape[0]), int(w.shape[1]), 0, 1
        return int(w.shape[1]), int(w.shape[0]), 1, 0

    def _write(self, ev: _Event, elem: Any, out_axis: int) -> None:
        self.tag(f"{ev.name}.weight", out_axis, elem)
        self.tag(f"{ev.name}.bias", 0, elem)

    def linear(self, ev: _Event) -> None:
        n_in, n_out, ax_in, ax_out = self._shape(ev)
        unit = self.units.get(ev.attn) if ev.attn else None
        if unit is not None and not unit.out_done:
            return self._attention_linear(ev, unit, n_in, n_out, ax_in, ax_out)
        p = self.pending
        if p is not None and n_in == p.width and (p.fused or len(p.qkv) == 3):
            return self._output_projection(ev, p, n_in, n_out, ax_in, ax_out)
        if not self.widths and n_out == self.width:
            # The first layer to run projects the model's (unpermuted) input features onto the
            # stream: a linear input embedding (sequences of feature vectors).
            self._write(ev, "res", ax_out)
            self._set(n_out, "res")
            return
        src = self.reads(n_in, ev.name)
        self.tag(f"{ev.name}.weight", ax_in, src)
        stream = self.source.get(src)
        if stream is not None and n_out == self._width_of(stream):
            out = stream  # a branch writing back to the stream it came from
        else:
            out = self.new(ev.name)
            self.source[out] = src
        self._write(ev, out, ax_out)
        self._set(n_out, out)

    def _set(self, width: int, elem: Any) -> None:
        self.last[width] = elem
        self.widths[elem] = width

    def _width_of(self, elem: Any) -> int | None:
        return self.widths.get(elem)

    def _attention_linear(self, ev, unit: _Attention, n_in, n_out, ax_in, ax_out) -> None:
        if unit.fused or len(unit.qkv) == 3:
            return self._output_projection(ev, unit, n_in, n_out, ax_in, ax_out)
        if not unit.qkv and n_out == 3 * n_in:
            unit.fused = True
            unit.stream = self.reads(n_in, ev.name)
            qk, vo = self._head_units(unit, n_in, ev.name)
            fused = ("qkv", unit.name)
            self.derived[fused] = (qk, qk, vo)
            self.tag(f"{ev.name}.weight", ax_in, unit.stream)
            self._write(ev, fused, ax_out)
            self._set(n_in, vo)
            self.source[vo] = unit.stream
            self.pending = unit
            return
        if unit.qkv and (ev.inp != unit.qkv[0].inp or n_out != n_in):
            raise ConfigError(f"transformer spec: attention '{unit.name}': projection '{ev.name}' "
                              "does not read the same input as the others, or changes the width "
                              "(cross-attention and grouped-query attention are not supported; "
                              "pass spec=)")
        unit.qkv.append(ev)
        if len(unit.qkv) < 3:
            return
        unit.stream = self.reads(n_in, ev.name)
        qk, vo = self._head_units(unit, n_out, unit.name)
        roles = _qkv_roles(unit.qkv)
        if roles is None:
            roles = self.roles or ["q", "k", "v"]
            self.guessed = True
        for e, role in zip(unit.qkv, roles, strict=True):
            i_in, _, a_in, a_out = self._shape(e)
            self.tag(f"{e.name}.weight", a_in, unit.stream)
            self._write(e, vo if role == "v" else qk, a_out)
        self._set(n_out, vo)
        self.source[vo] = unit.stream
        self.pending = unit

    def _output_projection(self, ev, unit: _Attention, n_in, n_out, ax_in, ax_out) -> None:
        if unit.out_done or n_in != unit.width:
            raise ConfigError(f"transformer spec: attention '{unit.name}': unexpected layer "
                              f"'{ev.name}' ({n_in} -> {n_out}; pass spec=)")
        vo = ("vo", unit.name)
        self.read.add(self.uf.find(vo))
        self.tag(f"{ev.name}.weight", ax_in, vo)
        if n_out != self._width_of(unit.stream):
            raise ConfigError(f"transformer spec: attention output '{ev.name}' writes {n_out} "
                              "units, not the residual stream's width (pass spec=)")
        self._write(ev, unit.stream, ax_out)
        self._set(n_out, unit.stream)
        unit.out_done = True
        self.pending = None

    # ---- result
    def loose_parameters(self, width: int, layers: set[str]) -> None:
        """Parameters held by non-layer modules (class token, position embeddings): on the
        stream when their last dimension is its width, else an error."""
        tagged = {ax[0] for ax, _ in self.axes}
        layer_tensors = {prm.data_ptr() for name, m in self.model.named_modules() if name in layers
                         for prm in m.parameters(recurse=False)}
        for mname, m in self.model.named_modules():
            if mname in layers or isinstance(m, nn.MultiheadAttention):
                continue
            for pname, prm in m.named_parameters(recurse=False):
                key = f"{mname}.{pname}" if mname else pname
                if key in tagged or key not in self.state or prm.data_ptr() in layer_tensors:
                    continue  # tied to a layer's tensor: `tie` gives it that tensor's permutations
                if prm.dim() >= 1 and prm.shape[-1] == width:
                    self.tag(key, prm.dim() - 1, "res")
                else:
                    raise ConfigError(f"transformer spec: cannot place parameter '{key}' (shape "
                                      f"{tuple(prm.shape)}) in the transformer's structure "
                                      "(pass spec=)")

    def tie(self) -> None:
        """Tensors stored under several keys (tied weights) share their permutations."""
        by_ptr: dict[tuple, list[str]] = {}
        for k, v in self.state.items():
            if v.is_floating_point() and v.numel():
                by_ptr.setdefault((v.data_ptr(), tuple(v.shape), tuple(v.stride())), []).append(k)
        elems = {ax: e for ax, e in self.axes}
        for keys in by_ptr.values():
            if len(keys) < 2:
                continue
            for axis in range(self.state[keys[0]].dim()):
                ref = elems.get((keys[0], axis), _FIXED)
                for k in keys[1:]:
                    self.uf.union(ref, elems.get((k, axis), _FIXED))
                for k in keys:
                    if (k, axis) not in elems:
                        self.axes.append(((k, axis), ref))
                        elems[(k, axis)] = ref

    def _head_roots(self) -> dict[Any, Any]:
        """{union-find root: head element} for every attention module's qk / vo units; an error
        when heads are tied to fixed or other units."""
        fixed = self.uf.find(_FIXED)
        head_roots = {self.uf.find(e): e for e in self.heads}
        for root, e in head_roots.items():
            if root == fixed or sum(self.uf.find(x) == root for x in self.heads) > 1:
                raise ConfigError(f"transformer spec: the heads of '{e[1]}' are tied to other "
                                  "units (unsupported; pass spec=)")
        return head_roots

    def _groups(self, kept: set[Any], order: Mapping[str, int]) -> dict[Any, list[Axis]]:
        """{root: its tagged axes in state order} for the roots in `kept`."""
        groups: dict[Any, list[Axis]] = {}
        for ax, elem in self.axes:
            root = self.uf.find(elem)
            if root not in kept:
                continue
            members = groups.setdefault(root, [])
            if ax not in members:
                members.append(ax)
        for members in groups.values():
            members.sort(key=lambda a: (order[a[0]], a[1]))
        return groups

    def _name(self, root: Any, members: list[Axis], special: Mapping[Any, Any]) -> str:
        """A permutation's name: ``P_<attn>.qk|vo|qkv``, ``P_res``, else ``P_<module>`` of
        the layer that writes it (its first axis-0 or bias member)."""
        e = special.get(root)
        if e is not None:
            return f"P_{e[1]}.{e[0]}"
        if root == self.uf.find("res"):
            return "P_res"
        anchor = next((k for k, a in members if a == 0 or k.endswith(".bias")), members[0][0])
        return "P_" + anchor.rsplit(".", 1)[0]

    def _sizes(self, groups: Mapping[Any, list[Axis]], names: Mapping[Any, str],
               derived_roots: Mapping[Any, Any], shapes: Mapping[str, tuple[int, ...]]
               ) -> dict[str, int]:
        """{permutation: units}, checked to agree over its axes; derived permutations sum
        their sources."""
        sizes: dict[str, int] = {}
        for root, members in groups.items():
            if root in derived_roots or not members:
                continue
            name, (k0, a0) = names[root], members[0]
            sizes[name] = shapes[k0][a0]
            for k, a in members:
                if shapes[k][a] != sizes[name]:
                    raise ConfigError(f"transformer spec: axis {a} of '{k}' has {shapes[k][a]} "
                                      f"units, '{k0}' {sizes[name]} (pass spec=)")
        for e in self.heads:  # width of sources seen only through a fused axis
            sizes.setdefault(names[self.uf.find(e)], self.head_width[e])
        for root, e in derived_roots.items():
            sizes[names[root]] = sum(sizes[names[self.uf.find(s)]] for s in self.derived[e])
        return sizes

    def spec(self) -> PermutationSpec:
        order = {k: i for i, k in enumerate(self.state)}
        head_roots = self._head_roots()
        derived_roots = {self.uf.find(e): e for e in self.derived}
        read = {self.uf.find(e) for e in self.read} | {self.uf.find("res")}
        kept = (read | set(head_roots) | set(derived_roots)) - {self.uf.find(_FIXED)}
        groups = self._groups(kept, order)
        special = {**derived_roots, **head_roots}  # heads named first
        names = {root: self._name(root, members, special) for root, members in groups.items()}
        # Head-structured sources of a fused projection may have no axis of their own.
        for root, e in head_roots.items():
            if root not in names:
                names[root] = f"P_{e[1]}.{e[0]}"
                groups[root] = []
        shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        sizes = self._sizes(groups, names, derived_roots, shapes)
        derived = {names[root]: tuple(names[self.uf.find(s)] for s in self.derived[e])
                   for root, e in derived_roots.items()}
        start = {root: min(((order[k], a) for k, a in m), default=(len(order), 0))
                 for root, m in groups.items()}
        perm_to_axes = {names[r]: groups[r] for r in sorted(groups, key=lambda r: start[r])}
        lookup = {ax: p for p, axes in perm_to_axes.items() for ax in axes}
        axes_to_perm = {k: tuple(lookup.get((k, a)) for a in range(len(s))) for k, s in shapes.items()}
        heads = {names[self.uf.find(e)]: hd for e, hd in self.heads.items()}
        return PermutationSpec(perm_to_axes, axes_to_perm, {p: sizes[p] for p in perm_to_axes},
                               {}, shapes, heads, derived)


def _qkv_roles(events: list[_Event]) -> list[str] | None:
    """Which of three projections reading one input are q, k, v, by their names when these say
    it (query/key/value, q_proj, to_q, ...); None when they do not (the builder then takes call
    order, and `transformer_spec` tries the value in the other places if the function check
    fails; q and k share a permutation, so only the value's place matters)."""
    def role(name: str) -> str | None:
        leaf = name.rsplit(".", 1)[-1].lower()
        for r, words in (("q", ("query", "q_proj", "to_q", "q", "wq", "q_lin")),
                         ("k", ("key", "k_proj", "to_k", "k", "wk", "k_lin")),
                         ("v", ("value", "v_proj", "to_v", "v", "wv", "v_lin"))):
            if leaf in words:
                return r
        return None
    roles = [role(e.name) for e in events]
    if sorted(r or "" for r in roles) != ["k", "q", "v"]:
        return None
    return [r for r in roles if r is not None]


def attention_modules(model: nn.Module, num_heads: int | Mapping[str, int] | None = None
                      ) -> dict[str, int]:
    """{module name: heads} for every attention module of `model`: modules with a head count
    attribute, ``nn.MultiheadAttention``, the names given in a `num_heads` dict; with an int
    `num_heads`, also modules with three or more Linear children and no head count."""
    found: dict[str, int] = {}
    if isinstance(num_heads, Mapping):
        modules = dict(model.named_modules())
        for name, given in num_heads.items():
            if name not in modules:
                raise ConfigError(f"num_heads names module '{name}', which the model lacks")
            found[name] = int(given)
    for name, m in model.named_modules():
        if name in found or m is model:
            continue
        h = _head_count(m)
        linears = [c for c in m.children() if _is_linear(c)]
        if isinstance(m, nn.MultiheadAttention):
            found[name] = int(m.num_heads)
        elif h and any(_is_linear(c) for c in m.modules()):
            found[name] = int(num_heads) if isinstance(num_heads, int) else h
        elif isinstance(num_heads, int) and len(linears) >= 3 and not any(
                name.startswith(f + ".") for f in found):
            found[name] = int(num_heads)
    # An outer module with a head count (e.g. a block keeping it for its attention child) is not
    # itself the attention module: keep the innermost.
    return {n: h for n, h in found.items()
            if not any(o.startswith(n + ".") for o in found if o != n)}


def transformer_spec(model: nn.Module, example_input: Any = None, *,
                     num_heads: int | Mapping[str, int] | None = None,
                     check: bool = True) -> PermutationSpec:
    """The permutation spec of a transformer (see the module docstring), read from one forward
    pass on `example_input` (a tensor or a dict of named inputs; built from the config for HF
    models when omitted).

    `num_heads`: an int (every attention module has that many heads; modules with three or
    more linear children and no head attribute count as attention), or {module name: heads}
    for your own attention modules. With `check` (default) the spec is verified: a random
    permutation must leave the outputs unchanged. Any failure is one `ConfigError` naming the
    module; the way out is a hand-built ``PermutationSpec`` passed as ``spec=``."""
    if example_input is None:
        example_input = example_input_for(model)
    param = next(iter(model.parameters()), None)
    if param is not None:
        example_input = move_batch(example_input, param.device)
    attention = attention_modules(model, num_heads)
    events = _record(model, example_input, attention)
    if not any(e.kind == "mha" for e in events) and not attention:
        raise ConfigError(f"{type(model).__name__}: found no attention module (no "
                          "nn.MultiheadAttention and no module with a head count); pass "
                          "num_heads= or spec=")
    width = _stream_width(model, events, attention)
    spec, guessed = _build(model, events, attention, width, None)
    if not check:
        return spec
    try:
        check_spec(model, spec, example_input)
    except ConfigError:
        if not guessed:
            raise
        # Unnamed q/k/v projections were taken in call order; try the value in the other
        # two places before giving up.
        for v_at in (0, 1):
            order = ["q", "k"]
            order.insert(v_at, "v")
            other, _ = _build(model, events, attention, width, order)
            try:
                check_spec(model, other, example_input)
                return other
            except ConfigError:
                continue
        raise
    return spec


def _build(model: nn.Module, events: list[_Event], attention: Mapping[str, int], width: int,
           roles: list[str] | None) -> tuple[PermutationSpec, bool]:
    """The spec from recorded events, and whether some q/k/v roles were guessed from call
    order (`roles` overrides those guesses)."""
    b = _Builder(model, attention, width, roles)
    layers = set()
    for ev in events:
        layers.add(ev.name)
        if ev.kind == "embed":
            b.embed(ev, width)
        elif ev.kind == "conv":
            b.conv(ev, width)
        elif ev.kind == "ln":
            b.layernorm(ev)
        elif ev.kind == "mha":
            b.mha(ev)
        else:
            b.linear(ev)
    if "res" not in {e for _, e in b.axes}:
        raise ConfigError(f"{type(model).__name__}: no embedding, patch or input projection writes "
                          f"the residual stream of width {width} (pass spec=)")
    open_units = [u.name for u in b.units.values() if u.qkv or u.fused]
    open_units = [n for n in open_units if not b.units[n].out_done]
    if open_units:
        raise ConfigError(f"transformer spec: attention '{open_units[0]}' has no output "
                          "projection after its query/key/value (pass spec=)")
    b.loose_parameters(width, layers | set(attention))
    b.tie()
    return b.spec(), b.guessed


def example_input_for(model: nn.Module) -> Any:
    x = example_input(model)
    if x is None:
        raise ConfigError(f"{type(model).__name__} is a transformer without an HF config: pass "
                          "an example input (or data) so its structure can be read")
    return x


def _stream_width(model: nn.Module, events: list[_Event], attention: Mapping[str, int]) -> int:
    """The residual width: the input width of the first attention module."""
    for ev in events:
        if ev.kind == "mha":
            return int(ev.module.embed_dim)
        if ev.kind == "linear" and ev.attn in attention:
            w = ev.module.weight
            return int(w.shape[0] if is_conv1d(ev.module) else w.shape[1])
    raise ConfigError(f"{type(model).__name__}: its attention modules "
                      f"({', '.join(list(attention)[:3]) or 'none'}) ran no linear layer on the "
                      "example input (pass spec=)")


def outputs(model: nn.Module, batch: Any, state: Mapping[str, torch.Tensor] | None = None
            ) -> torch.Tensor:
    """The output tensor of `model` on `batch` (eval mode, no gradients), optionally with
    `state` substituted (tied duplicates dropped)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            if state is None:
                out = forward(model, batch)
            else:
                keys = dict(model.named_parameters()) | dict(model.named_buffers())
                params = {k: state[k] for k in keys if k in state}
                args, kwargs = ((), dict(batch)) if isinstance(batch, Mapping) else ((batch,), None)
                out = functional_call(model, params, args, kwargs)
        return output_tensor(out)
    finally:
        model.train(was)


def check_spec(model: nn.Module, spec: PermutationSpec, example: Any, seed: int = 0) -> None:
    """Raise `ConfigError` unless a random permutation of `spec` leaves the outputs of `model`
    on `example` unchanged (eval mode). A model whose output is the residual stream itself (a
    base model's hidden states) may return it in the permuted order of ``P_res``."""
    from basinmerge.align.permute import apply_permutation, random_permutation

    device = next(iter(model.parameters())).device
    example = move_batch(example, device)
    before = outputs(model, example)
    perm = random_permutation(spec, seed)
    after = outputs(model, example, apply_permutation(spec, perm, model.state_dict()))
    candidates = [before]
    if "P_res" in perm and before.shape[-1] == spec.sizes["P_res"]:
        candidates.append(before.index_select(-1, perm["P_res"].to(before.device)))
    scale = float(before.abs().max()) + 1e-6
    err = min(float((c - after).abs().max()) for c in candidates)
    if not math.isfinite(err) or err > 1e-4 * scale + 1e-5:
        raise ConfigError(f"transformer spec for {type(model).__name__} does not preserve its "
                          f"outputs (max difference {err:.3g}); its structure is not one the "
                          "builder understands: pass spec=")


def check_same_structure(spec_a: PermutationSpec, spec_b: PermutationSpec) -> None:
    """One error naming the first attention module where two transformer specs differ (head
    counts), or the first key whose shape differs (widths)."""
    for p, (group, d) in spec_a.heads.items():
        other = spec_b.heads.get(p)
        if other is None or other[1] != d:
            heads_a = spec_a.sizes[p] // d
            heads_b = spec_b.sizes[p] // other[1] if other else "no"
            raise IncompatibleModelsError(f"attention '{group}' has {heads_a} heads in model A "
                                          f"and {heads_b} in model B")
    for k, s in spec_a.shapes.items():
        if spec_b.shapes.get(k) != s:
            raise IncompatibleModelsError(f"key '{k}' has shape {s} in model A and "
                                          f"{spec_b.shapes.get(k)} in model B")
