"""Soft Merging (Chen et al., arXiv 2309.12259) with hard-concrete gates (Louizos et al. 2018).

The models' weights stay frozen. Every (merge unit, model) pair gets a gate z in [0, 1] drawn
from a hard-concrete distribution with a learned location log_alpha:

    u ~ U(eps, 1 - eps),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)          (beta = 2/3, gamma = -0.1, zeta = 1.1)

so exact 0 and exact 1 have non-zero probability. A merged unit is the gate-normalized sum
``sum_k z_k theta_k / (sum_k z_k + eps)``; the loss is the task cross-entropy plus
``lam * mean expected L0`` with ``E[L0] = sigmoid(log_alpha - beta log(-gamma / zeta))``; only
the gates are trained (SGD by default, as in the paper; Adam as an option). The network runs
through `torch.func.functional_call` with the stacked frozen weights, so no model is modified,
in eval mode (no dropout) with BatchNorm on batch statistics (`state.batch_statistics`).
At the end one plain model is built with the deterministic test-time gates
``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``.

A unit is all parameters of one module (``units="module"``, the default), one parameter tensor
(``units="tensor"``) or a list of names (each a parameter key or a module prefix); everything
outside the units (and all buffers) comes from the plain average of the models or from a
``reference`` (a model index or a state_dict). Module units are the default because they were
measured to be more robust (docs/results.md, merging study): with per-tensor units a
sign-flipped member's *bias* gates stay open (a flipped bias costs the task loss little, so
its gate hardly moves), and a noise member kept two of its six gates partly open in one seed
of three; with module units a bias shares its weight's gate, and every gate of every bad
member closed exactly in all runs, at the same clean accuracy. Reconstructed details (the paper's text was not available): gate logits start at
``init`` (2.0: every gate open with probability 0.97); each gradient entry is clipped to
[-clip, clip] so that one enormous gradient (a malicious member) cannot throw a good gate far
off in a single step; a unit whose test-time gates are all 0 takes the model with the largest
log_alpha. Models trained from different initializations must be aligned (permuted) before
soft merging; this module does not do that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from basinmerge import adapter
from basinmerge.console import progress_task
from basinmerge.errors import ConfigError
from basinmerge.merge._common import (
    ModelLike,
    batches,
    bcast,
    finish_bn,
    labeled,
    module_state,
    prepare,
    template_of,
    work_dtype,
)
from basinmerge.merge.registry import merge_method
from basinmerge.state import (
    StateDict,
    as_state_dict,
    batch_statistics,
    check_compatible,
    param_keys,
    retie,
    tied_groups,
    weighted_average,
    with_state,
)

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
OPTIMIZERS = ("sgd", "adam")


# --------------------------------------------------------------------------- hard concrete


def hard_concrete_sample(log_alpha: torch.Tensor, *, beta: float = BETA, gamma: float = GAMMA,
                         zeta: float = ZETA, generator: torch.Generator | None = None,
                         eps: float = 1e-6) -> torch.Tensor:
    """One reparameterized sample z per entry of `log_alpha` (differentiable in log_alpha)."""
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype)
    u = (u * (1 - 2 * eps) + eps).to(log_alpha.device)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, *, beta: float = BETA, gamma: float = GAMMA,
                zeta: float = ZETA) -> torch.Tensor:
    """P(z > 0) per gate, in closed form: sigmoid(log_alpha - beta * log(-gamma / zeta))."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def deterministic_gate(log_alpha: torch.Tensor, *, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """The deterministic test-time gate clamp(sigmoid(log_alpha)(zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- units and gates


def _split_names(units: str | Sequence[str]) -> str | Sequence[str]:
    """``"layers.0,head"`` (from the command line) as a list of names."""
    if isinstance(units, str) and "," in units:
        return [u.strip() for u in units.split(",") if u.strip()]
    return units


def soft_units(template: nn.Module, units: str | Sequence[str] = "module") -> list[tuple[str, list[str]]]:
    """The merge units as (name, parameter keys): one per tensor, one per module, or one per
    given name (a parameter key or a module prefix). A tied parameter appears once, under its
    canonical name (`state.param_keys`)."""
    keys = param_keys(template)
    units = _split_names(units)
    if isinstance(units, str):
        if units == "tensor":
            return [(k, [k]) for k in keys]
        if units == "module":
            groups: dict[str, list[str]] = {}
            for k in keys:
                groups.setdefault(k.rsplit(".", 1)[0] if "." in k else k, []).append(k)
            return list(groups.items())
        raise ConfigError(f"soft units must be 'tensor', 'module' or a list of names, got '{units}'")
    out: list[tuple[str, list[str]]] = []
    taken: dict[str, str] = {}
    for name in units:
        sel = [k for k in keys if k == name or k.startswith(name + ".")]
        if not sel:
            raise ConfigError(f"soft unit '{name}' matches no parameter of the model")
        for k in sel:
            if k in taken:
                raise ConfigError(f"soft units '{taken[k]}' and '{name}' both contain '{k}'")
            taken[k] = name
        out.append((name, sel))
    if not out:
        raise ConfigError("soft: the list of units is empty")
    return out


@dataclass
class GateTable:
    """The learned gates: log_alpha of shape (units, models) and what it means."""

    units: list[str]
    models: list[str]
    log_alpha: torch.Tensor
    unit_keys: list[list[str]]
    fallback_units: list[str]
    skipped_steps: int = 0

    @property
    def gates(self) -> torch.Tensor:
        """The deterministic test-time gates used to build the merged model."""
        return deterministic_gate(self.log_alpha)

    @property
    def open_probability(self) -> torch.Tensor:
        """P(z > 0) of each gate (the expected L0)."""
        return expected_l0(self.log_alpha)

    def rows(self) -> list[list[Any]]:
        g, p = self.gates, self.open_probability
        return [[u, m, float(self.log_alpha[i, j]), float(g[i, j]), float(p[i, j])]
                for i, u in enumerate(self.units) for j, m in enumerate(self.models)]

    def model_summary(self) -> list[dict[str, Any]]:
        """Per model: mean test-time gate and the fraction of units at exactly 0 and 1."""
        g = self.gates
        return [{"model": m, "mean_gate": float(g[:, j].mean()),
                 "closed": float((g[:, j] == 0).double().mean()),
                 "open": float((g[:, j] == 1).double().mean())} for j, m in enumerate(self.models)]

    def to_dict(self) -> dict:
        return {"units": self.units, "models": self.models, "unit_keys": self.unit_keys,
                "log_alpha": self.log_alpha.tolist(), "gates": self.gates.tolist(),
                "open_probability": self.open_probability.tolist(),
                "fallback_units": self.fallback_units, "skipped_steps": self.skipped_steps,
                "summary": self.model_summary()}


def gated_combination(gates: torch.Tensor, stacked: Mapping[str, torch.Tensor],
                      units: Sequence[tuple[str, list[str]]], eps: float) -> dict[str, torch.Tensor]:
    """sum_k z_k theta_k / (sum_k z_k + eps) for every unit (gates: (units, K))."""
    out: dict[str, torch.Tensor] = {}
    for u, (_, keys) in enumerate(units):
        w = gates[u] / (gates[u].sum() + eps)
        for k in keys:
            out[k] = (bcast(w, stacked[k]) * stacked[k]).sum(dim=0)
    return out


def _reference_state(states: list[StateDict], names: list[str], reference: Any) -> StateDict:
    if reference is None or (isinstance(reference, str) and reference == "average"):
        return weighted_average(states)
    if isinstance(reference, int) and not isinstance(reference, bool):
        if not 0 <= reference < len(states):
            raise ConfigError(f"soft reference index {reference} is outside 0..{len(states) - 1}")
        return states[reference]
    if isinstance(reference, (nn.Module, Mapping)):
        ref = as_state_dict(reference)
        check_compatible([states[0], ref], [names[0], "reference"])
        return ref
    raise ConfigError("soft reference must be 'average', a model index, a model or a state_dict")


# --------------------------------------------------------------------------- soft merging


def _aligned_states(template: nn.Module, states: list[dict], method: str, data, seed: int) -> list[dict]:
    """The states with models 1..K-1 permuted onto model 0 (Git Re-Basin)."""
    from basinmerge.align import align as align_model

    if method not in ("weight", "activation"):
        raise ConfigError(f"soft align must be 'weight' or 'activation', got '{method}'")
    anchor = with_state(template, states[0])
    out = [states[0]]
    for s in states[1:]:
        moved = align_model(anchor, with_state(template, s), method,
                            data=None if method == "weight" else data, seed=seed)
        out.append(as_state_dict(moved))
    return out


def _soft_result(out: tuple[nn.Module, GateTable]) -> tuple[StateDict, dict]:
    model, gates = out
    return {k: v.detach() for k, v in model.state_dict().items()}, {"gates": gates}


@merge_method("soft", summary="Soft Merging: learned hard-concrete gates per (unit, model)",
              needs_data="labeled", min_models=2, convert=_soft_result)
def soft(models: Sequence[ModelLike], data: Any, *, units: str | Sequence[str] = "module",
         lam: float = 0.01, steps: int = 300, lr: float = 0.1, seed: int = 0,
         optimizer: str = "sgd", momentum: float = 0.9, batch_size: int = 128, init: float = 2.0,
         clip: float | None = 1.0, reference: Any = None, model: nn.Module | None = None,
         reset_bn: bool = True, eps: float = 1e-8, progress: bool = True,
         names: Sequence[str] | None = None, align: str | None = None,
         task: str | None = None) -> tuple[nn.Module, GateTable]:
    """Soft-merge the models with gates learned on labeled `data`; returns the plain merged
    model (deterministic test-time gates) and the gate table.

    ``align="weight"`` (or ``"activation"``) first permutes every model's hidden units onto the
    first model's (`basinmerge.align.align`): needed when the models come from different
    initializations, since their units are then in unrelated orders.

    Options:
        units: module (default), tensor, or a list of parameter keys / module prefixes
        lam: weight of the expected-L0 penalty
        steps: optimization steps
        lr: learning rate of the gate logits
        seed: seed of the gate samples and batch order
        optimizer: sgd (as in the paper) or adam
        momentum: SGD momentum
        batch_size: labeled examples per step
        init: initial gate logit log_alpha (2.0: every gate open with probability 0.97)
        clip: clip each gate-gradient entry to [-clip, clip] (None: no clipping)
        reference: 'average' or a model index for everything outside the units
        model: the nn.Module template to run the states in (default: the first module given)
        reset_bn: recompute BatchNorm statistics of the merge on the data
        eps: added to the gate sum in the gated combination
        progress: show a progress bar
        align: weight or activation: permute every model's units onto the first's first
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"soft optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
    if steps < 0 or lr <= 0 or lam < 0 or batch_size < 1:
        raise ConfigError(f"soft needs steps >= 0, lr > 0, lam >= 0 and batch_size >= 1 "
                          f"(got steps={steps}, lr={lr}, lam={lam}, batch_size={batch_size})")
    if clip is not None and clip <= 0:
        raise ConfigError(f"soft clip must be positive or None, got {clip}")
    states, _, names = prepare(models, "soft", min_models=2, names=names)
    template = template_of(models, model, "soft")
    d = labeled(data, "soft", template, task)
    if align is not None:
        states = _aligned_states(template, states, align, d, seed)
    unit_list = soft_units(template, units)
    gated = [k for _, ks in unit_list for k in ks]
    ref = module_state(template, _reference_state(states, names, reference))
    device = next(iter(ref.values())).device
    stacked = {k: torch.stack([s[k].to(device, work_dtype(s[k].dtype)) for s in states]) for k in gated}
    rest = {k: v.detach().clone() for k, v in ref.items() if k not in stacked}
    log_alpha = torch.full((len(unit_list), len(states)), float(init), device=device,
                           requires_grad=True)
    opt = (torch.optim.SGD([log_alpha], lr=lr, momentum=momentum) if optimizer == "sgd"
           else torch.optim.Adam([log_alpha], lr=lr))
    gen = torch.Generator().manual_seed(int(seed))
    it = batches(len(d), batch_size, gen)
    skipped = 0
    # BatchNorm uses batch statistics (`rest` holds copies of the buffers); no dropout
    with batch_statistics(template):
        with progress_task("soft merge", steps, enabled=progress) as advance:
            for _ in range(steps):
                batch = d.take(next(it))
                xb = adapter.to_device(batch.inputs, device)
                z = hard_concrete_sample(log_alpha, generator=gen)
                params = gated_combination(z, stacked, unit_list, eps)
                logits = adapter.call(template, {**rest, **params}, xb)
                task_loss = adapter.loss(logits, batch.labels, xb, task)
                loss = task_loss + lam * expected_l0(log_alpha).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad = log_alpha.grad
                assert grad is not None  # log_alpha is a leaf that requires grad
                if not torch.isfinite(loss) or not torch.isfinite(grad).all():
                    skipped += 1  # an overflowing sample says nothing reliable; skip it
                    advance(1, skipped=skipped)
                    continue
                if clip is not None:
                    grad.clamp_(-clip, clip)
                opt.step()
                advance(1, loss=float(task_loss.detach()))
    la = log_alpha.detach().cpu()
    gates = deterministic_gate(la)
    fallback = []
    for u, (name, _) in enumerate(unit_list):
        if gates[u].sum() == 0:
            gates[u, int(la[u].argmax())] = 1.0
            fallback.append(name)
    with torch.no_grad():
        merged = gated_combination(gates.to(device), stacked, unit_list, eps)
    state = {k: (merged[k].to(states[0][k].dtype).cpu() if k in merged else ref[k].cpu())
             for k in states[0] if k in ref}
    state = retie(state, tied_groups(template))
    state = finish_bn(template, state, d, reset_bn)
    table = GateTable([n for n, _ in unit_list], names, la, [ks for _, ks in unit_list],
                      fallback, skipped)
    out = with_state(template, state)
    out.eval()
    return out, table
