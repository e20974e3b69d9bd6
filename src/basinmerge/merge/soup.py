"""Greedy soup (Wortsman et al., ICML 2022).

Sort the models by held-out accuracy; start from the best; add the next model only if the
held-out accuracy of the uniform average of the chosen models strictly improves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from basinmerge.merge._common import ModelLike, finish_bn, labeled, prepare, template_of
from basinmerge.merge.registry import merge_method
from basinmerge.state import StateDict, weighted_average, with_state
from basinmerge.train import evaluate


def accuracy_of(template: nn.Module, state: StateDict, data: Any) -> float:
    """Accuracy of `state` in `template`'s architecture (on a copy; the template is untouched)."""
    return evaluate(with_state(template, state), labeled(data, "greedy_soup", template))["accuracy"]


@merge_method("greedy_soup", summary="greedy soup by held-out accuracy", needs_data="labeled",
              returns_info=True)
def greedy_soup_info(models: Sequence[ModelLike], data: Any, *, model: nn.Module | None = None,
                     reset_bn: bool = True, names: Sequence[str] | None = None) -> tuple[StateDict, dict]:
    """The greedy soup and a record: each model's held-out accuracy, the order tried, the
    models kept and the soup's held-out accuracy after each accepted model.

    Options:
        model: the nn.Module template to run the states in (default: the first module given)
        reset_bn: recompute BatchNorm statistics of every candidate soup on the data
    """
    states, _, names = prepare(models, "greedy_soup", names=names)
    template = template_of(models, model, "greedy_soup")
    data = labeled(data, "greedy_soup", template)
    accs = [accuracy_of(template, finish_bn(template, s, data, reset_bn), data) for s in states]
    order = sorted(range(len(states)), key=lambda i: -accs[i])
    chosen = [order[0]]
    best_state = finish_bn(template, states[order[0]], data, reset_bn)
    best = accs[order[0]]
    trace = [best]
    for i in order[1:]:
        cand = finish_bn(template, weighted_average([states[j] for j in chosen + [i]]), data, reset_bn)
        acc = accuracy_of(template, cand, data)
        if acc > best:
            chosen.append(i)
            best, best_state = acc, cand
            trace.append(acc)
    info = {"accuracies": dict(zip(names, accs, strict=True)), "order": [names[i] for i in order],
            "chosen": [names[i] for i in chosen], "soup_accuracy": trace}
    return {k: v.clone() for k, v in best_state.items()}, info


def greedy_soup(models: Sequence[ModelLike], data: Any, *, model: nn.Module | None = None,
                reset_bn: bool = True, names: Sequence[str] | None = None) -> StateDict:
    """Greedy soup of the models, judged by accuracy on the held-out `data`."""
    return greedy_soup_info(models, data, model=model, reset_bn=reset_bn, names=names)[0]
