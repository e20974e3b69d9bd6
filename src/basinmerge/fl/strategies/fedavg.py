"""FedAvg (McMahan et al. 2017): the clients train plainly; the server averages their models
weighted by sample count (or with a robust rule: ``aggregator="median"`` / ``"trimmed-mean"``)."""

from basinmerge.fl.strategy import Strategy, register


@register
class FedAvg(Strategy):
    name = "fedavg"
    summary = "sample-count weighted average"
