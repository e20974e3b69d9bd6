"""Element-wise training penalties (callables ``model -> scalar tensor``, see `basinmerge.train`).

- `ProximalPenalty(reference, mu)`: FedProx's proximal term ``μ/2 · Σ ‖w − w_ref‖²`` toward a
  fixed reference (a shared initialization, the global model of a federated round).

The reference is stored as a detached *list* of tensor copies, bound to the model's parameters
by name. (A generator of parameters would be exhausted after the first batch and the penalty
would silently become zero; a reference that aliases the live parameters would make it zero too.)
The squared norm is used, not the norm: its gradient ``μ (w − w_ref)`` is defined at w = w_ref.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from basinmerge.errors import ConfigError


class ProximalPenalty:
    """``μ/2 · Σ_params ‖w − w_ref‖²`` over every parameter the reference holds.

    `reference`: a model or a mapping name -> tensor (e.g. a state_dict); only the names that
    are parameters of the trained model are used, and each must match its shape. `keys`
    restricts the term to some parameters."""

    def __init__(self, reference: nn.Module | Mapping[str, torch.Tensor], mu: float,
                 keys: list[str] | None = None):
        if not mu >= 0:
            raise ConfigError(f"proximal mu must be >= 0, got {mu}")
        self.mu = float(mu)
        ref = dict(reference.named_parameters()) if isinstance(reference, nn.Module) else dict(reference)
        if keys is not None:
            missing = [k for k in keys if k not in ref]
            if missing:
                raise ConfigError(f"proximal reference lacks parameter '{missing[0]}'")
            ref = {k: ref[k] for k in keys}
        # Detached copies: later changes to the reference model must not move the anchor.
        self.reference: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in ref.items()}
        self._bound: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._bound_to: int | None = None

    def _bind(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        named = dict(model.named_parameters())
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k, r in self.reference.items():
            if k not in named:
                continue  # buffers and the like: not trained, no term
            p = named[k]
            if p.shape != r.shape:
                raise ConfigError(f"proximal reference '{k}' has shape {tuple(r.shape)}, the model's "
                                  f"parameter has {tuple(p.shape)}")
            pairs.append((p, r.to(device=p.device, dtype=p.dtype)))
        if not pairs:
            raise ConfigError("the proximal reference shares no parameter with the model")
        self._bound_to = id(model)
        return pairs

    def __call__(self, model: nn.Module) -> torch.Tensor:
        if self._bound is None or self._bound_to != id(model):
            self._bound = self._bind(model)
        total = torch.stack([((p - r) ** 2).sum() for p, r in self._bound]).sum()
        return 0.5 * self.mu * total

    def __repr__(self) -> str:
        return f"ProximalPenalty(mu={self.mu}, tensors={len(self.reference)})"
