"""What ``mlmd train`` is asked: the model's default hyper-parameters, :class:`TrainConfig` and
the command-line flags, torch-free so that ``mlmd --help`` starts in a fraction of a second."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Dict

from ..errors import InputError

DTYPE_NAMES = ("float32", "float64")
POSTERIORS = ("ensemble", "sgmcmc")

DEFAULT_HYPERPARAMETERS: Dict[str, float] = {
    "cutoff": 5.0,          # Å
    "channels": 32,         # C, features per atom (and per point of its sphere signal)
    "layers": 2,
    "degree": 3,            # L, spherical-harmonic degree of the kernel in o . d / r
    "correlation": 3,       # nu, highest product of sphere signals integrated (body order nu + 1)
    "radial_basis": 8,      # Bessel functions
    "radial_width": 64,     # hidden width of the radial MLP
    "envelope_exponent": 6,
}


@dataclass
class TrainConfig:
    data: str
    out: str
    committee: int = 1
    epochs: int = 300
    batch_size: int = 5               # measured on ethanol, 5 min, committee 4: 0.0164 eV/Å (10 frames: 0.0197)
    lr: float = 1e-2                  # 30 epochs, batch 10: 0.0218 (5e-3: 0.0245; 4e-2 diverges)
    weight_decay: float = 1e-5
    warmup_epochs: int = 5
    ema_decay: float = 0.99
    patience: int = 50
    energy_weight: float = 1.0
    force_weight: float = 10.0
    stress_weight: float = 1.0        # a_W, for frames with a stress label (periodic data)
    n_train: int = 500
    n_val: int = 50
    n_test: int = 100
    seed: int = 0
    bootstrap: bool = False
    augment_rotations: bool = False   # rotate each batch at random (the model is exactly invariant: no gain)
    dtype: str = "float32"
    export_dtype: str = "float32"
    resume: bool = False
    max_minutes: float = 0.0          # 0: no limit; a hard stop, the schedule still runs over `epochs`
    budget_minutes: float = 0.0       # > 0: train for this wall time, the cosine schedule over time, not epochs
    progress: bool = True
    hyperparameters: Dict[str, float] = field(default_factory=dict)
    # "ensemble": M independently trained members (AdamW); "sgmcmc": M chains of preconditioned
    # SG-Hamiltonian Monte Carlo with a cyclical step (mlmd.models.sgmcmc) whose end-of-cycle samples
    # form the committee (M x sgmcmc_samples members)
    posterior: str = "ensemble"
    sgmcmc_cycles: int = 4            # step-size cycles over the run; one sample per chain at each end
    sgmcmc_samples: int = 2           # the last cycles whose samples are kept (committee: up to chains x this)
    sgmcmc_temperature: float = 1.0   # T of exp(-U/T): 1 the Bayesian posterior, < 1 a cold one
    sgmcmc_prior_std: float = 1.0     # s, Gaussian prior on every weight
    sgmcmc_exploration: float = 0.5   # fraction of each cycle without noise (moving to a new mode)

    def validate(self) -> None:
        for name in ("committee", "epochs", "batch_size", "n_train", "n_val"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.n_test < 0:
            raise InputError(f"n_test: must be >= 0, got {self.n_test}")
        for name in ("dtype", "export_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise InputError(f"{name}: expected one of {list(DTYPE_NAMES)}, got {getattr(self, name)!r}")
        if self.budget_minutes < 0 or self.max_minutes < 0:
            raise InputError("budget_minutes/max_minutes: must be >= 0 (0 = no limit)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.posterior not in POSTERIORS:
            raise InputError(f"posterior: expected one of {list(POSTERIORS)}, got {self.posterior!r}")
        if self.posterior == "sgmcmc":
            if not 1 <= self.sgmcmc_samples <= self.sgmcmc_cycles:
                raise InputError(f"sgmcmc_samples: keep between 1 and sgmcmc_cycles ({self.sgmcmc_cycles}) samples "
                                 f"per chain, got {self.sgmcmc_samples}")
            if not self.budget_minutes and self.epochs < self.sgmcmc_cycles:
                raise InputError(f"sgmcmc_cycles: {self.sgmcmc_cycles} cycles need at least as many epochs, "
                                 f"got epochs={self.epochs}")
            if self.sgmcmc_temperature < 0 or self.sgmcmc_prior_std <= 0 or not 0 <= self.sgmcmc_exploration < 1:
                raise InputError("sgmcmc_temperature >= 0, sgmcmc_prior_std > 0 and 0 <= sgmcmc_exploration < 1 "
                                 f"are needed, got {self.sgmcmc_temperature}, {self.sgmcmc_prior_std}, "
                                 f"{self.sgmcmc_exploration}")
            if self.resume:
                raise InputError("resume: an sgmcmc run cannot be continued yet (its samples are not in the "
                                 "checkpoint); start it again")
        unknown = set(self.hyperparameters) - set(DEFAULT_HYPERPARAMETERS)
        if unknown:
            raise InputError(f"hyperparameters: unknown {sorted(unknown)}; known: {sorted(DEFAULT_HYPERPARAMETERS)}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names and v is not None}
        values["hyperparameters"] = {k: getattr(args, k) for k in DEFAULT_HYPERPARAMETERS
                                     if getattr(args, k, None) is not None}
        values["progress"] = not getattr(args, "no_progress", False)
        return cls(**values)


_NUMBER_FLAGS = (
    ("epochs", int, "maximum epochs (the cosine schedule runs over them unless --budget-minutes)"),
    ("batch_size", int, "frames per optimiser step"),
    ("patience", int, "early stopping: epochs without a better EMA validation loss"),
    ("n_train", int, "training frames"),
    ("n_val", int, "validation frames (early stopping, EMA choice)"),
    ("n_test", int, "test frames, never seen in training (metrics.json)"),
    ("seed", int, "seed of the data split, the batch order and every member's initial weights"),
    ("warmup_epochs", int, "linear learning-rate warm-up epochs"),
    ("lr", float, "peak AdamW learning rate"),
    ("weight_decay", float, "AdamW weight decay"),
    ("ema_decay", float, "decay of the weight EMA used for validation and export, in [0, 1)"),
    ("energy_weight", float, "a_E, weight of the per-atom energy term of the loss"),
    ("force_weight", float, "a_F, weight of the force term of the loss"),
    ("stress_weight", float, "a_W, weight of the virial term (frames with a stress label)"),
    ("max_minutes", float, "hard stop after this wall time, 0 = none"),
    ("sgmcmc_cycles", int, "sgmcmc: step-size cycles, one sample per chain at the end of each"),
    ("sgmcmc_samples", int, "sgmcmc: samples kept per chain, from the last cycles (committee = M x this)"),
    ("sgmcmc_temperature", float, "sgmcmc: posterior temperature T (1 Bayesian, < 1 cold)"),
    ("sgmcmc_prior_std", float, "sgmcmc: standard deviation of the Gaussian prior on each weight"),
    ("sgmcmc_exploration", float, "sgmcmc: fraction of each cycle without noise"),
    ("budget_minutes", float, "train for this wall time, schedule over time, 0 = use --epochs"),
)

_HYPERPARAMETER_HELP = {
    "cutoff": "model cutoff radius, Å",
    "channels": "features per atom",
    "layers": "interaction layers",
    "degree": "spherical-harmonic degree L of the sphere signal",
    "correlation": "highest product of sphere signals, nu (body order nu + 1)",
    "radial_basis": "Bessel functions of the radial basis",
    "radial_width": "hidden width of the radial MLP",
    "envelope_exponent": "exponent p of the polynomial cutoff envelope",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig.__dataclass_fields__
    p.add_argument("data", help="extxyz file with energy and forces")
    p.add_argument("--out", required=True, help="run directory (checkpoint, model.pt, parity.png, metrics.json)")
    p.add_argument("--committee", type=int, default=d["committee"].default, help="members M")
    p.add_argument("--bootstrap", action="store_true", help="each member trains on a bootstrap resample")
    p.add_argument("--posterior", default=None, choices=list(POSTERIORS),
                   help="ensemble: M independently trained members (default); sgmcmc: M chains of "
                        "preconditioned SG-Hamiltonian Monte Carlo with a cyclical step, their samples form the "
                        "committee")
    p.add_argument("--augment-rotations", dest="augment_rotations", action="store_true", default=None,
                   help="rotate every training batch at random (no gain for the exactly invariant model)")
    for name, kind, text in _NUMBER_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=d[name].default,
                       help=f"{text} ({d[name].default})")
    p.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES),
                   help="training precision (float32)")
    p.add_argument("--export-dtype", default="float32", choices=list(DTYPE_NAMES),
                   help="precision of the exported model.pt (float32)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (a larger --budget-minutes or --epochs trains on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs per epoch instead)")
    for name, default in DEFAULT_HYPERPARAMETERS.items():
        kind = float if name == "cutoff" else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{_HYPERPARAMETER_HELP.get(name, 'model hyper-parameter')} ({default})")
