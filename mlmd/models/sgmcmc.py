"""Posterior sampling of a committee's weights: preconditioned stochastic-gradient Hamiltonian
Monte Carlo (SGHMC, Chen et al. 2014, with pSGLD's RMSprop preconditioner, Li et al. 2016) and a
cyclical step size (cSG-MCMC, Zhang et al. 2020): the sampler of ``mlmd train --posterior
sgmcmc``, which Thaler et al. compare with deep ensembles.

Every committee member of the batched model is one chain (the weights' member axis), so C chains
run in one pass. For one chain, the negative log posterior of its weights θ is

    U(θ) = n_obs · L̄(θ) / (2 σ²) + |θ|² / (2 s²)

with L̄ the mean per-frame training loss (mlmd.models.train's, dimensionless: a mean over each
frame's force components and its energy), n_obs the number of those labels in the training set
(3N + 1 per frame), σ² the likelihood variance in the loss's units (a running mean of the batch
loss during the noise-free phases, held while sampling: the residual variance of the fit) and s
the prior's standard deviation of each weight. Training steps on σ²·U at temperature T·σ² (the
same distribution, a gradient whose scale does not follow σ²: mlmd.models.train.sgmcmc_step). The chains sample exp(-U/T): T = 1 is the Bayesian
posterior, T < 1 a "cold" one. One step, per weight element, with ĝ the minibatch estimate of
∇U and friction a = 1 − momentum:

    V ← α V + (1 − α) ĝ²,   G = 1 / (δ + √V)                       (RMSprop preconditioner)
    v ← (1 − a) v − η G ĝ + √(2 a η T G) ξ,   θ ← θ + v,   η = lr · a,   ξ ~ N(0, 1)

so ``lr`` is the step an Adam-like optimiser with that momentum takes (a steady gradient moves θ
by lr·G·ĝ a step). The noise is added only in the sampling phase of each cycle, and not in a
weight tensor's first 20 steps while V is first estimated (V ≈ 0 would make G = 1/δ). The
Γ(θ) correction for the preconditioner's drift is left out, as usual: with α = 0.999 the
samples of a Gaussian target come out within a few % of its variance (tests/test_sgmcmc.py).

Measured on the way: plain pSGLD (no momentum) reached a 5x higher validation loss than AdamW in
the same time on ethanol, and with α = 0.99 its samples of a Gaussian were 34 % too wide.

The step size runs in cycles: ε_k = ε₀ (1 + cos π r_k) / 2 with r_k the position in the cycle
(after a linear ramp over the first quarter of every cycle but the first, which has the
training's warm-up: a restart at the full step from a converged sample diverged, measured);
the first ``exploration`` fraction of each cycle moves without noise (to a new mode), the rest
samples, and the weights at the end of each cycle are one posterior sample per chain (a sample
whose validation loss is over REJECT_FACTOR times the median of the kept ones is left out).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


class PSGHMC(torch.optim.Optimizer):
    """Preconditioned SGHMC on gradients of U(θ) (see the module docstring). The caller sets each
    group's ``lr`` (a cyclical schedule) and ``noise`` (False while exploring); ``temperature`` is a
    number or a tensor [M] of one per chain (the weights' first axis)."""

    #: steps of each weight tensor without noise while V is first estimated
    WARMUP_STEPS = 20

    def __init__(self, params: Iterable, lr: float = 1e-2, temperature: float = 1.0, momentum: float = 0.9,
                 alpha: float = 0.999, delta: float = 1e-5, generator: torch.Generator | None = None):
        if lr <= 0 or float(torch.as_tensor(temperature).min()) < 0 or not 0 <= momentum < 1 or not 0 < alpha < 1:
            raise ValueError(f"PSGHMC: lr > 0, temperature >= 0, 0 <= momentum < 1, 0 < alpha < 1; got {lr}, "
                             f"{temperature}, {momentum}, {alpha}")
        super().__init__(params, dict(lr=lr, temperature=temperature, momentum=momentum, alpha=alpha, delta=delta,
                                      noise=True))
        self.generator = generator

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            friction = 1.0 - group["momentum"]
            eta = group["lr"] * friction
            temperature, alpha, delta, noise = group["temperature"], group["alpha"], group["delta"], group["noise"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "square_avg" not in state:
                    state["square_avg"] = p.grad.pow(2)
                    state["velocity"] = torch.zeros_like(p)
                    state["step"] = 0
                state["step"] += 1
                square_avg, velocity = state["square_avg"], state["velocity"]
                square_avg.mul_(alpha).addcmul_(p.grad, p.grad, value=1.0 - alpha)
                preconditioner = 1.0 / (delta + square_avg.sqrt())
                velocity.mul_(1.0 - friction).addcmul_(preconditioner, p.grad, value=-eta)
                if noise and state["step"] > self.WARMUP_STEPS:
                    chain_temperature = temperature
                    if isinstance(temperature, torch.Tensor):
                        chain_temperature = temperature.to(p.dtype).reshape(-1, *([1] * (p.dim() - 1)))
                    xi = torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=self.generator)
                    velocity.addcmul_((2.0 * friction * eta * chain_temperature * preconditioner).sqrt(), xi)
                p.add_(velocity)
        return None


def cycle_position(progress: float, cycles: int) -> tuple:
    """(cycle index from 0, position r in [0, 1) within it) at ``progress`` in [0, 1] of the run."""
    scaled = min(max(progress, 0.0), 1.0) * cycles
    index = min(int(scaled), cycles - 1)
    return index, scaled - index


def step_factor(r: float) -> float:
    """ε_k / ε₀ at position r of a cycle: a cosine from 1 down to ~0."""
    return 0.5 * (1.0 + math.cos(math.pi * r))


#: a sample whose validation loss exceeds this many times the median of the kept samples' is left
#: out of the committee (measured: a cold-posterior run's last sample of one chain, caught blowing
#: up at its cycle's end, had 8x the others' force error and made the committee 2.5x worse)
REJECT_FACTOR = 3.0


def accepted_samples(validation_loss: torch.Tensor, factor: float = REJECT_FACTOR) -> list:
    """The (sample, chain) pairs to keep from ``validation_loss`` [S,C]: those within ``factor`` of
    the median over all pairs (finite ones only)."""
    loss = validation_loss.double()
    finite = torch.isfinite(loss)
    if not bool(finite.any()):
        return []
    limit = factor * float(loss[finite].median())
    return [(s, c) for s in range(loss.shape[0]) for c in range(loss.shape[1])
            if bool(finite[s, c]) and float(loss[s, c]) <= limit]

