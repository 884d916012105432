"""Posterior sampling of a committee's weights: preconditioned stochastic-gradient Langevin
dynamics (pSGLD, Li et al. 2016) with a cyclical step size (cSG-MCMC, Zhang et al. 2020), the
sampler of ``mlmd train --posterior sgmcmc`` (Thaler et al. compare it with deep ensembles).

Every committee member of the batched model is one chain (the weights' member axis), so C chains
run in one pass. For one chain, the negative log posterior of its weights θ is

    U(θ) = n_train · L̄(θ) / (2 σ²) + |θ|² / (2 s²)

with L̄ the mean per-frame training loss (mlmd.models.train's, dimensionless), σ² the likelihood
variance in the same units (estimated as a running mean of the batch loss: the residual variance
of the fit, so that the likelihood is neither far too flat nor too sharp) and s the prior's
standard deviation of each weight. The chains sample exp(-U/T): T = 1 is the Bayesian posterior,
T < 1 a "cold" one. One step, per weight element, with ĝ the minibatch estimate of ∇U:

    V ← α V + (1 − α) ĝ²,     G = 1 / (δ + √V)                       (RMSprop preconditioner)
    θ ← θ − ε_k G ĝ + √(2 ε_k T G) ξ,    ξ ~ N(0, 1)                  (noise only while sampling)

(the Γ(θ) correction of pSGLD for the preconditioner's drift is left out, as usual; δ = 1e-5 as
in Li et al., and no noise in a weight tensor's first 20 steps, while V is first estimated). That
omission biases the samples when V follows θ quickly: on a Gaussian target the variance came out
+34 % with α = 0.99 and +3-5 % with α = 0.999, the default (measured; holding V fixed while
sampling removes the bias in theory but blew up weights whose V had been estimated near zero). The
step size runs in cycles: ε_k = ε₀ (1 + cos π r_k) / 2 with r_k the position in the cycle; the
first ``exploration`` fraction of each cycle moves without noise (to a new mode), the rest adds
the noise, and the weights at the end of each cycle are one posterior sample per chain.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


class PSGLD(torch.optim.Optimizer):
    """pSGLD on gradients of U(θ) (see the module docstring). ``lr`` is ε₀·(cycle factor), set by
    the caller each step; ``temperature`` T; ``noise`` False during the exploration phase."""

    #: steps of each weight tensor without noise while V is first estimated (a V near 0 would make
    #: G = 1/δ and the noise explode: measured with a zero starting gradient)
    WARMUP_STEPS = 20

    def __init__(self, params: Iterable, lr: float = 1e-2, temperature: float = 1.0, alpha: float = 0.999,
                 delta: float = 1e-5, generator: torch.Generator | None = None):
        if lr <= 0 or temperature < 0 or not 0 < alpha < 1:
            raise ValueError(f"PSGLD: lr > 0, temperature >= 0, 0 < alpha < 1; got {lr}, {temperature}, {alpha}")
        super().__init__(params, dict(lr=lr, temperature=temperature, alpha=alpha, delta=delta, noise=True))
        self.generator = generator

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, temperature = group["lr"], group["temperature"]
            alpha, delta, noise = group["alpha"], group["delta"], group["noise"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "square_avg" not in state:
                    state["square_avg"] = p.grad.pow(2)
                    state["step"] = 0
                state["step"] += 1
                square_avg = state["square_avg"]
                sampling = noise and temperature > 0 and state["step"] > self.WARMUP_STEPS
                square_avg.mul_(alpha).addcmul_(p.grad, p.grad, value=1.0 - alpha)
                preconditioner = 1.0 / (delta + square_avg.sqrt())
                p.addcmul_(preconditioner, p.grad, value=-lr)
                if sampling:
                    xi = torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=self.generator)
                    p.addcmul_((2.0 * lr * temperature * preconditioner).sqrt(), xi)
        return None


def cycle_position(progress: float, cycles: int) -> tuple:
    """(cycle index from 0, position r in [0, 1) within it) at ``progress`` in [0, 1] of the run."""
    scaled = min(max(progress, 0.0), 1.0) * cycles
    index = min(int(scaled), cycles - 1)
    return index, scaled - index


def step_factor(r: float) -> float:
    """ε_k / ε₀ at position r of a cycle: a cosine from 1 down to ~0."""
    return 0.5 * (1.0 + math.cos(math.pi * r))
