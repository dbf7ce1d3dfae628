"""benchmarks/sampler_overhead.py's op count: ops outside the network, none from inside it."""

from types import SimpleNamespace

import torch

from benchmarks.sampler_overhead import TimedNet, ops_per_step
from difforge.core import DiscreteVP, ModelDenoiser, get_sigmas
from difforge.samplers import sample


class Net(torch.nn.Module):
    """eps = x passed through `depth` elementwise ops (each one an aten op)."""

    def __init__(self, depth: int):
        super().__init__()
        self.depth = depth

    def forward(self, x, t):
        for _ in range(self.depth):
            x = x * 0.5
        return SimpleNamespace(sample=x)


def _count(depth: int, sampler: str) -> float:
    timed = TimedNet(Net(depth))
    den = ModelDenoiser(timed, DiscreteVP(), "eps")
    sigmas = get_sigmas("karras", 6, process=DiscreteVP())

    def run():
        with torch.no_grad():
            sample(den, sigmas, shape=(1, 4, 4), seeds=[0], sampler=sampler)

    return ops_per_step(timed, run, 6)


def test_the_network_s_own_ops_are_not_counted_and_the_sampler_s_are():
    assert _count(1, "euler") == _count(50, "euler") > 0
    assert _count(1, "heun") > _count(1, "euler")  # two denoiser calls per step: more ops
