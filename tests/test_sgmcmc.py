"""The SG-MCMC posterior (mlmd.models.sgmcmc, ``mlmd train --posterior sgmcmc``): the sampler draws
from exp(-U/T), and its end-of-cycle samples form a committee file in the usual contract."""
import json
import os

import numpy as np
import pytest
import torch

from mlmd.errors import InputError

from conftest import ETHANOL_DATA


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_psgld_samples_a_gaussian_at_its_temperature(temperature):
    """U(θ) = θ²/(2 s²) for 20,000 independent weights: the chain's stationary variance is T s²
    (red if the noise lacks its factor 2 or its preconditioner), and T = 0 is plain optimisation."""
    from mlmd.models.sgmcmc import PSGHMC

    s = 0.3
    # starts 3x wider than the target: the chain has to relax to it
    theta = torch.nn.Parameter(3 * s * torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    sampler = PSGHMC([theta], lr=1e-2, temperature=temperature, generator=torch.Generator().manual_seed(0))
    draws = []
    for step in range(6000):
        sampler.zero_grad()
        (theta.pow(2).sum() / (2 * s ** 2)).backward()
        sampler.step()
        if step >= 3000 and step % 50 == 0:
            draws.append(theta.detach().clone())
    variance = torch.stack(draws).var().item()
    assert variance == pytest.approx(temperature * s ** 2, rel=0.1)

    cold = torch.nn.Parameter(torch.full((100,), 1.0, dtype=torch.float64))
    optimiser = PSGHMC([cold], lr=1e-2, temperature=0.0)
    for _ in range(500):
        optimiser.zero_grad()
        (cold.pow(2).sum() / (2 * s ** 2)).backward()
        optimiser.step()
    assert cold.abs().max().item() < 1e-2


def test_sgmcmc_training_writes_a_committee_of_its_samples(tmp_path):
    """2 chains x 2 kept cycles = a committee of up to 4 in one model file (less any sample far worse
    than the others on validation); its members differ, samples of one chain at two cycle ends too."""
    import mlmd
    from mlmd.models.train import TrainConfig, train

    config = TrainConfig(data=ETHANOL_DATA, out=str(tmp_path / "sg"), committee=2, epochs=4, n_train=40, n_val=10,
                         n_test=20, posterior="sgmcmc", sgmcmc_cycles=2, sgmcmc_samples=2, progress=False,
                         hyperparameters={"channels": 8})
    result = train(config)
    summary = json.load(open(tmp_path / "sg" / "metrics.json"))["summary"]
    rejected = summary["sgmcmc"]["rejected_samples"]
    assert summary["committee"] == 4 - len(rejected) >= 2 and summary["posterior"] == "sgmcmc"
    assert summary["sgmcmc"]["cycles_sampled"] == [0, 1]
    potential = mlmd.load(result["model_path"])
    assert potential.committee_size == summary["committee"]
    import ase.io

    out = potential.compute_atoms(ase.io.read(ETHANOL_DATA, "0"))
    forces = out["member_forces"]
    size = potential.committee_size
    assert min(np.abs(forces[i] - forces[j]).max() for i in range(size) for j in range(i)) > 1e-4
    assert os.path.isfile(tmp_path / "sg" / "parity.png")


def test_sgmcmc_options_are_checked_by_name(tmp_path):
    from mlmd.models.train import TrainConfig

    for changes, match in [({"sgmcmc_samples": 5}, "sgmcmc_samples: keep between 1 and sgmcmc_cycles"),
                           ({"posterior": "mcmc"}, "posterior: expected one of"),
                           ({"resume": True}, "resume: an sgmcmc run cannot be continued"),
                           ({"epochs": 2}, "sgmcmc_cycles: 4 cycles need at least as many epochs")]:
        config = TrainConfig(data=ETHANOL_DATA, out=str(tmp_path), **{"posterior": "sgmcmc", **changes})
        with pytest.raises(InputError, match=match):
            config.validate()


def test_a_diverged_chain_stops_training_with_the_fix(tmp_path):
    """A chain whose loss turns non-finite stops the run, naming the chain and the options to change,
    instead of writing NaN members into a committee file."""
    from mlmd.errors import MLMDError
    from mlmd.models.train import TrainConfig, train

    config = TrainConfig(data=ETHANOL_DATA, out=str(tmp_path / "sg"), committee=2, epochs=4, n_train=20, n_val=5,
                         n_test=5, posterior="sgmcmc", sgmcmc_cycles=2, sgmcmc_samples=1, progress=False,
                         lr=1e6, warmup_epochs=1, hyperparameters={"channels": 8})
    with pytest.raises(MLMDError, match=r"sgmcmc: chain\(s\) \[.*\] diverged .* lower --lr"):
        train(config)
    assert not os.path.exists(tmp_path / "sg" / "model.pt")


def test_a_sample_far_worse_than_the_others_is_left_out():
    from mlmd.models.sgmcmc import accepted_samples

    loss = torch.tensor([[0.010, 0.012], [0.011, 0.090]])        # [sample, chain]: one blew up
    assert accepted_samples(loss) == [(0, 0), (0, 1), (1, 0)]
    assert accepted_samples(torch.tensor([[0.01, float("nan")]])) == [(0, 0)]
    assert len(accepted_samples(torch.full((2, 2), 0.02))) == 4
