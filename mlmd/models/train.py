"""Training of a model or a committee (``mlmd train``).

All M members train in one batched pass (their weights carry a member axis), each with
its own seed and, with ``bootstrap``, its own resampling of the training frames; since
AdamW acts element-wise and the loss is a sum over members, this is exactly M
independent trainings run side by side.

Loss per member m, over a batch of frames g with N_g atoms (errors divided by the
force RMS s of the training data, so both terms are dimensionless):

    L_m = sum_g w_mg [ a_E ((E_g - E*_g) / (N_g s))^2 + a_F mean_i,k ((F_gik - F*_gik) / s)^2
                       + a_W mean_kl ((W_gkl - W*_gkl) / (N_g s))^2 ] / sum_g w_mg

The last term only for periodic frames labelled with a stress sigma* (Voigt, eV/Å^3), whose
virial W* = -sigma* V (eV) is compared with the model's; it is what teaches E(V) to a bulk.

AdamW with linear warm-up then cosine decay, an exponential moving average (EMA) of the
weights used for validation, test and export, early stopping per member on the EMA
validation loss, and a resumable checkpoint written atomically after every epoch.

``posterior="sgmcmc"`` samples instead of optimising: the M members are M chains of
preconditioned SG-Hamiltonian Monte Carlo with a cyclical step size (:mod:`mlmd.models.sgmcmc`), and
the committee written is the chains' weights at the end of the last ``sgmcmc_samples`` cycles
(M x sgmcmc_samples members, less any sample whose validation loss is over 3x the median: no
EMA, no early stopping).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional

import numpy as np
import torch

from .. import keys, units
from ..errors import InputError, MLMDError
from ..threads import keep_freed_memory
from ..uncertainty import calibrate_file
from .data import fingerprint, read_dataset
from .config import DEFAULT_HYPERPARAMETERS, TrainConfig, add_train_arguments  # noqa: F401  (re-exported)
from .ponita import PonitaPotential

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------
# graphs


class Graphs:
    """Frames turned into edge vectors once (positions are fixed during training)."""

    def __init__(self, frames, species: List[int], cutoff: float, dtype: torch.dtype):
        from ..neighbors import neighbor_pairs

        index_of = {z: i for i, z in enumerate(species)}
        self.items = []
        self.volumes: List[float] = []   # Å^3 per frame, 0 for open frames
        for atoms in frames:
            edge_index, shifts = neighbor_pairs(atoms.positions, np.asarray(atoms.cell), atoms.pbc, cutoff)
            pos = atoms.positions
            vectors = pos[edge_index[1]] - pos[edge_index[0]] + shifts
            results = atoms.calc.results
            virial = None
            if keys.DATA_STRESS in results and atoms.pbc.all():
                from ase.stress import voigt_6_to_full_3x3_stress
                stress = np.asarray(results[keys.DATA_STRESS], dtype=np.float64)
                stress = voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)
                virial = torch.as_tensor(-stress * atoms.get_volume(), dtype=dtype)
            self.items.append({
                "species": torch.tensor([index_of[int(z)] for z in atoms.numbers], dtype=torch.long),
                "edge_index": torch.as_tensor(edge_index),
                "vectors": torch.as_tensor(vectors, dtype=dtype),
                "energy": float(results[keys.DATA_ENERGY]),
                "forces": torch.as_tensor(np.asarray(results[keys.DATA_FORCES]), dtype=dtype),
                "virial": virial,
            })
            self.volumes.append(float(atoms.get_volume()) if atoms.pbc.all() else 0.0)
        self.has_virials = any(item["virial"] is not None for item in self.items)

    def __len__(self):
        return len(self.items)

    def batch(self, indices) -> Dict[str, torch.Tensor]:
        species, edges, vectors, forces, batch, energies, counts = [], [], [], [], [], [], []
        virials, has_virial = [], []
        offset = 0
        for g, k in enumerate(indices):
            item = self.items[int(k)]
            n = item["species"].shape[0]
            species.append(item["species"])
            edges.append(item["edge_index"] + offset)
            vectors.append(item["vectors"])
            forces.append(item["forces"])
            batch.append(torch.full((n,), g, dtype=torch.long))
            energies.append(item["energy"])
            counts.append(n)
            has_virial.append(item["virial"] is not None)
            virials.append(item["virial"] if item["virial"] is not None
                           else torch.zeros((3, 3), dtype=item["vectors"].dtype))
            offset += n
        dtype = vectors[0].dtype
        return {"species": torch.cat(species), "edge_index": torch.cat(edges, dim=1),
                "vectors": torch.cat(vectors), "forces": torch.cat(forces), "batch": torch.cat(batch),
                "energy": torch.tensor(energies, dtype=dtype), "n_atoms": torch.tensor(counts, dtype=dtype),
                "virial": torch.stack(virials), "has_virial": torch.tensor(has_virial),
                "frames": torch.as_tensor(np.asarray(indices, dtype=np.int64))}


def random_rotation(generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A uniformly distributed proper rotation [3,3] (QR of a Gaussian matrix)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def rotate_batch(batch: Dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Rotate a batch's edge vectors, force labels and virial labels (R W Rᵀ) by one random
    rotation, in place: the augmentation that teaches the finite S^2 grid invariance."""
    rotation = random_rotation(generator, batch["vectors"].dtype)
    batch["vectors"] = batch["vectors"] @ rotation.t()
    batch["forces"] = batch["forces"] @ rotation.t()
    batch["virial"] = rotation @ batch["virial"] @ rotation.t()


def predict(model: PonitaPotential, batch: Dict[str, torch.Tensor], create_graph: bool,
            compute_virial: bool = False):
    """Member energies [M,G] eV, forces [M,N,3] eV/Å and, if asked, virials [M,G,3,3] eV
    (else None) for a batch of G frames."""
    out = model.energy_and_forces(batch["vectors"], batch["species"], batch["edge_index"], compute_virial,
                                  create_graph, compute_virial)
    atom_energy = out["atom_energy"]
    energies = torch.zeros((atom_energy.shape[0], batch["energy"].shape[0]), dtype=atom_energy.dtype)
    energies = energies.index_add(1, batch["batch"], atom_energy)
    virials = None
    if compute_virial:
        virials = torch.zeros((atom_energy.shape[0], batch["energy"].shape[0], 3, 3), dtype=atom_energy.dtype)
        virials = virials.index_add(1, batch["batch"], out["atom_virial"])
    return energies, out["forces"], virials


def ema_decay_at(decay: float, step: int) -> float:
    """Decay of the weight EMA after optimizer step ``step`` (1, 2, ...): min(decay, (1 + t) / (10 + t)),
    the warm-up of TensorFlow's and torch_ema's averages (MACE's).

    A fixed 0.99 from the first step keeps 0.99^t of the random initial weights in the average:
    66 % after one epoch of 42 copper batches, 8 % after six, so a budget of a few epochs exported
    a blend of trained and random weights (copper, 6 epochs: 0.118 eV/Å test force MAE).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def optimizer_step(model, batch, scale: float, config: "TrainConfig", weights: Optional[torch.Tensor],
                   optimizer, scheduler) -> float:
    """One gradient step on the summed member losses of ``batch``; returns that loss."""
    loss = member_losses(model, batch, scale, config, weights, True).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def sgmcmc_step(model, batch, scale: float, config: "TrainConfig", weights: Optional[torch.Tensor],
                optimizer, scheduler, likelihood_variance: torch.Tensor, observations: float,
                update_variance: bool) -> float:
    """One SGHMC step of every chain towards exp(-U/T), U = n_obs · L̄ / (2σ²) + |θ|² / (2 s²)
    (mlmd.models.sgmcmc), n_obs = ``observations``, the labels of the training set.

    The gradient taken is that of σ²·U = n_obs · L̄ / 2 + σ² |θ|² / (2 s²), with the temperature
    T·σ² per chain (the same distribution): as σ² falls with the loss (100x over a run), U's
    gradient would grow 100x faster than the preconditioner's running V follows it, and the steps
    with it (both runs that took U itself diverged, measured). σ² per chain is a running mean of
    its batch loss, updated in place only while ``update_variance`` (the noise-free phases): were
    it updated while sampling, the noise would raise the loss, the loss σ², and σ² the noise.
    Returns the summed loss."""
    losses = member_losses(model, batch, scale, config, weights, True)                  # [M]
    observed = losses.detach().to(likelihood_variance.dtype)
    if bool((likelihood_variance == 0).all()):
        likelihood_variance.copy_(observed)
    elif update_variance:
        likelihood_variance.mul_(0.99).add_(observed, alpha=0.01)
    variance = likelihood_variance.clamp_min(1e-12).to(losses.dtype)
    members = losses.shape[0]
    prior = sum(p.pow(2).reshape(members, -1).sum(dim=1) for p in model.parameters())           # [M]
    scaled_potential = (observations * losses / 2.0 + variance * prior / (2.0 * config.sgmcmc_prior_std ** 2)).sum()
    for group in optimizer.param_groups:
        group["temperature"] = config.sgmcmc_temperature * variance.detach()
    optimizer.zero_grad(set_to_none=True)
    scaled_potential.backward()
    optimizer.step()
    scheduler.step()
    return float(losses.detach().sum())


def committee_from_samples(init: Dict, members: List[tuple]) -> PonitaPotential:
    """A committee whose member k holds the weights of chain c in sample s for ``members[k]`` =
    (sample dict, c) (every weight carries the member axis first); ``init["committee"]`` must be
    len(members)."""
    model = build_model(init).to(next(iter(members[0][0].values())).dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for index, (sample, chain) in enumerate(members):
            for name, value in params.items():
                value[index].copy_(sample[name][chain])
    return model


def member_losses(model, batch, scale: float, config: TrainConfig, weights: Optional[torch.Tensor],
                  create_graph: bool) -> torch.Tensor:
    """[M] loss per member (see module docstring)."""
    use_virial = config.stress_weight > 0 and bool(batch["has_virial"].any())
    energies, forces, virials = predict(model, batch, create_graph, use_virial)
    n_atoms = batch["n_atoms"]
    e_err = ((energies - batch["energy"].unsqueeze(0)) / (n_atoms.unsqueeze(0) * scale)).pow(2)   # [M,G]
    f_err = ((forces - batch["forces"].unsqueeze(0)) / scale).pow(2).mean(dim=-1)               # [M,N]
    f_frame = torch.zeros_like(e_err).index_add(1, batch["batch"], f_err) / n_atoms.unsqueeze(0)
    per_frame = config.energy_weight * e_err + config.force_weight * f_frame
    if virials is not None:
        w_err = ((virials - batch["virial"].unsqueeze(0)) / (n_atoms[None, :, None, None] * scale))
        w_err = w_err.pow(2).mean(dim=(-1, -2)) * batch["has_virial"].to(w_err.dtype).unsqueeze(0)
        per_frame = per_frame + config.stress_weight * w_err
    if weights is None:
        return per_frame.mean(dim=1)
    w = weights[:, batch["frames"]].to(per_frame.dtype)                                          # [M,G]
    return (per_frame * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------
# statistics from the training frames


def fit_reference_energies(frames, species: List[int]) -> np.ndarray:
    """Per-element energies E0 [S] eV by least squares on E ≈ sum_Z n_Z E0_Z (minimum norm)."""
    counts = np.array([[np.sum(a.numbers == z) for z in species] for a in frames], dtype=np.float64)
    energies = np.array([a.calc.results[keys.DATA_ENERGY] for a in frames])
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return solution


def refit_energy_shift(model: PonitaPotential, graphs: "Graphs", indices: List[int]) -> np.ndarray:
    """Correct the per-element reference energies E0 [S] in place by least squares on the
    committee-mean energy residuals of the frames ``indices``; returns the correction [S] eV.

    A constant per element carries no force, so the gradient steps (where forces dominate the
    loss) learn it slowly; after training it is fitted in closed form instead.
    """
    counts, residuals = [], []
    n_species = int(model.energy_shift.shape[0])
    for lo in range(0, len(indices), 50):
        batch = graphs.batch(indices[lo:lo + 50])
        energies, _, _ = predict(model, batch, False)
        residuals.append((batch["energy"].double() - energies.detach().double().mean(0)).numpy())
        one_hot = torch.nn.functional.one_hot(batch["species"], n_species).double()
        counts.append(torch.zeros((len(batch["energy"]), n_species), dtype=torch.float64)
                      .index_add(0, batch["batch"], one_hot).numpy())
    correction, *_ = np.linalg.lstsq(np.concatenate(counts), np.concatenate(residuals), rcond=None)
    with torch.no_grad():
        model.energy_shift.add_(torch.as_tensor(correction, dtype=model.energy_shift.dtype))
    return correction


def dataset_statistics(frames, graphs: "Graphs", indices: List[int]) -> Dict[str, float]:
    """Force RMS/std (eV/Å) and mean neighbours per atom of the frames at ``indices``."""
    forces = np.concatenate([np.asarray(frames[k].calc.results[keys.DATA_FORCES]).ravel() for k in indices])
    neighbours = [graphs.items[k]["edge_index"].shape[1] / max(graphs.items[k]["species"].shape[0], 1)
                  for k in indices]
    return {"force_rms": float(np.sqrt(np.mean(forces ** 2))),
            "force_std": float(np.std(forces)),
            "avg_num_neighbors": float(max(np.mean(neighbours), 1.0))}


# ---------------------------------------------------------------------------------------


def _split(n_frames: int, config: TrainConfig) -> Dict[str, List[int]]:
    need = config.n_train + config.n_val + config.n_test
    if need > n_frames:
        raise InputError(f"n_train + n_val + n_test = {need} but the data set has {n_frames} frames; "
                         "lower --n-train/--n-val/--n-test or label more frames")
    order = np.random.default_rng(config.seed).permutation(n_frames)
    return {"test": order[:config.n_test].tolist(),
            "val": order[config.n_test:config.n_test + config.n_val].tolist(),
            "train": order[config.n_test + config.n_val:need].tolist()}


def _member_slices_copy(dst: Dict[str, torch.Tensor], src: Dict[str, torch.Tensor], member: int) -> None:
    for name, value in src.items():
        dst[name][member].copy_(value[member])


def _save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_model(init: Dict) -> PonitaPotential:
    return PonitaPotential(init["species"], committee_size=init["committee"], seed=init["seed"],
                           hyperparameters=init["hyperparameters"], energy_shift=init["energy_shift"],
                           energy_scale=init["energy_scale"], avg_num_neighbors=init["avg_num_neighbors"])


def train(config: TrainConfig) -> Dict:
    """Train, evaluate on the test split, write OUT/{checkpoint.pt, model.pt, metrics.json, parity.png}."""
    from tqdm.auto import tqdm

    config.validate()
    keep_freed_memory()
    os.makedirs(config.out, exist_ok=True)
    checkpoint_path = os.path.join(config.out, "checkpoint.pt")
    frames = read_dataset(config.data)
    split = _split(len(frames), config)
    train_frames = [frames[i] for i in split["train"]]
    dtype = _DTYPES[config.dtype]

    resume_state = None
    if config.resume:
        if not os.path.isfile(checkpoint_path):
            raise InputError(f"resume: no checkpoint at {checkpoint_path!r}; drop --resume to start anew")
        resume_state = torch.load(checkpoint_path, weights_only=True)
        if resume_state["split"] != split:
            raise InputError("resume: the data set or split options differ from the checkpoint's; "
                             "use the same data and --n-train/--n-val/--n-test/--seed")
        init = resume_state["model_init"]
        graphs = Graphs(frames, init["species"], float(init["hyperparameters"]["cutoff"]), dtype)
    else:
        species = sorted({int(z) for a in frames for z in a.numbers})
        hp = dict(DEFAULT_HYPERPARAMETERS)
        hp.update(config.hyperparameters)
        graphs = Graphs(frames, species, float(hp["cutoff"]), dtype)
        stats = dataset_statistics(frames, graphs, split["train"])
        init = {"species": species, "committee": config.committee, "seed": config.seed,
                "hyperparameters": hp,
                "energy_shift": fit_reference_energies(train_frames, species).tolist(),
                "energy_scale": stats["force_rms"], "avg_num_neighbors": stats["avg_num_neighbors"],
                "force_std": stats["force_std"]}
    model = build_model(init).to(dtype)
    scale = float(init["energy_scale"])
    members = model.committee_size

    generator = torch.Generator().manual_seed(config.seed)
    weights = None
    if config.bootstrap:
        n_train = len(split["train"])
        weights = torch.zeros(members, len(frames))
        for m in range(members):
            draw = torch.randint(0, n_train, (n_train,), generator=torch.Generator().manual_seed(config.seed + 7919 * m))
            idx = torch.as_tensor(split["train"])[draw]
            weights[m].index_add_(0, idx, torch.ones(n_train))

    sgmcmc = config.posterior == "sgmcmc"
    if sgmcmc:
        from .sgmcmc import PSGHMC, cycle_position, step_factor

        optimizer = PSGHMC(model.parameters(), lr=config.lr, temperature=config.sgmcmc_temperature,
                           generator=torch.Generator().manual_seed(config.seed + 104729))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(split["train"]) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch

    budget_s = 60.0 * config.budget_minutes
    elapsed_before = 0.0
    t_start = time.perf_counter()

    def run_progress(step: int) -> float:
        """How far the run is, 0..1: by wall time with a budget, else by optimizer steps."""
        if budget_s:
            return (elapsed_before + time.perf_counter() - t_start) / budget_s
        return step / max(1, total_steps)

    def warmup_ramp(step: int, progress: float) -> float:
        """Linear warm-up: over warmup_epochs, or 5 % of a budget if that comes first."""
        if budget_s:
            return min(1.0, max(progress / 0.05, (step + 1) / max(1, warmup)))
        return min(1.0, (step + 1) / max(1, warmup))

    def lr_factor(step: int) -> float:
        if sgmcmc:
            # the warm-up as for the ensemble (measured: a chain started at the full step went NaN
            # in its first epoch), then the cycles' cosine
            progress = run_progress(step)
            cycle, position = cycle_position(progress, config.sgmcmc_cycles)
            # and each later cycle ramps up over its first quarter: restarting at the full step from
            # a converged sample (V small, G large) sent a chain to NaN in both runs that tried it,
            # and a ramp over 10 % in one of two (measured)
            restart = min(1.0, position / 0.25) if cycle > 0 else 1.0
            return warmup_ramp(step, progress) * restart * step_factor(position)
        if budget_s:
            # the cosine runs over the wall-time budget, whatever the epoch count; the warm-up
            # ends after warmup_epochs or 5 % of the budget, whichever comes first (a budget of
            # a few epochs would otherwise be spent warming up)
            progress = run_progress(step)
            return warmup_ramp(step, progress) * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    params = dict(model.named_parameters())
    ema = {k: v.detach().clone() for k, v in params.items()}
    best = {k: v.detach().clone() for k, v in params.items()}
    best_val = torch.full((members,), float("inf"))
    stall = torch.zeros(members, dtype=torch.long)
    history: List[Dict] = []
    samples: List[Dict[str, torch.Tensor]] = []      # sgmcmc: the chains' weights at each cycle's end
    sampled_cycles: List[int] = []
    likelihood_variance = torch.zeros(members)          # sgmcmc: σ², running mean of each chain's batch loss
    # the labels behind the mean loss: 3N force components and one energy per training frame
    observations = float(sum(3 * len(frames[i]) + 1 for i in split["train"]))
    start_epoch = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        ema = resume_state["ema"]
        best = resume_state["best"]
        best_val = resume_state["best_val"]
        stall = resume_state["stall"]
        history = resume_state["history"]
        start_epoch = int(resume_state["epoch"])
        elapsed_before = float(resume_state["elapsed"])
        generator.set_state(resume_state["rng"])

    def evaluate_with(state: Dict[str, torch.Tensor], indices: List[int]) -> torch.Tensor:
        saved = {k: v.detach().clone() for k, v in params.items()}
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(state[k])
        total = torch.zeros(members, dtype=torch.float64)
        for lo in range(0, len(indices), 50):
            chunk = indices[lo:lo + 50]
            total += member_losses(model, graphs.batch(chunk), scale, config, None, False).detach().double() * len(chunk)
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(saved[k])
        return (total / len(indices)).float()

    t_start = time.perf_counter()
    train_index = torch.as_tensor(split["train"])
    epoch = start_epoch
    max_epochs = config.epochs if not budget_s else 10 ** 9
    bar = tqdm(total=None if budget_s else config.epochs, initial=start_epoch, desc=f"training M={members}",
               unit="epoch", disable=not config.progress)
    stopped = "epochs"
    while epoch < max_epochs:
        if budget_s and elapsed_before + time.perf_counter() - t_start >= budget_s:
            stopped = "budget"      # a resumed run whose budget was spent: evaluate and export only
            break
        model.train()
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        running = 0.0
        for lo in range(0, len(order), config.batch_size):
            batch = graphs.batch(order[lo:lo + config.batch_size].tolist())
            if config.augment_rotations:
                rotate_batch(batch, generator)
            if sgmcmc:
                cycle, position = cycle_position(run_progress(scheduler.last_epoch), config.sgmcmc_cycles)
                for group in optimizer.param_groups:
                    group["noise"] = position >= config.sgmcmc_exploration
                loss = sgmcmc_step(model, batch, scale, config, weights, optimizer, scheduler,
                                   likelihood_variance, observations, position < config.sgmcmc_exploration)
                next_cycle, _ = cycle_position(run_progress(scheduler.last_epoch), config.sgmcmc_cycles)
                if next_cycle != cycle and cycle not in sampled_cycles:
                    samples.append({k: v.detach().clone() for k, v in params.items()})
                    sampled_cycles.append(cycle)
            else:
                loss = optimizer_step(model, batch, scale, config, weights, optimizer, scheduler)
                decay = ema_decay_at(config.ema_decay, scheduler.last_epoch)
                with torch.no_grad():
                    for k, v in params.items():
                        ema[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
            running += loss / members
        epoch += 1
        model.eval()
        if sgmcmc:      # the chains' current weights: there is no EMA or best state to choose
            val = evaluate_with({k: v.detach() for k, v in params.items()}, split["val"])
        else:
            val = evaluate_with(ema, split["val"])
        if sgmcmc and not bool(torch.isfinite(val).all()):
            bad = [m for m in range(members) if not bool(torch.isfinite(val[m]))]
            raise MLMDError(f"sgmcmc: chain(s) {bad} diverged (non-finite validation loss) in epoch {epoch}; "
                            f"lower --lr (now {config.lr:g}) or raise --warmup-epochs (now {config.warmup_epochs})")
        improved = val < best_val
        for m in range(members):
            if bool(improved[m]):
                _member_slices_copy(best, ema, m)
        best_val = torch.where(improved, val, best_val)
        stall = torch.where(improved, torch.zeros_like(stall), stall + 1)
        elapsed = elapsed_before + time.perf_counter() - t_start
        history.append({"epoch": epoch, "train_loss": running / steps_per_epoch,
                        "val_loss": val.tolist(), "lr": scheduler.get_last_lr()[0], "elapsed_s": elapsed})
        _save_atomic({"config": asdict(config), "model_init": init, "model": model.state_dict(),
                      "ema": ema, "best": best, "best_val": best_val, "stall": stall,
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "epoch": epoch, "elapsed": elapsed, "rng": generator.get_state(),
                      "history": history, "split": split}, checkpoint_path)
        bar.set_postfix(train=f"{running / steps_per_epoch:.3g}", val=f"{float(val.mean()):.3g}")
        bar.update(1)
        if not sgmcmc and bool((stall >= config.patience).all()):
            stopped = "early stopping"
            break
        if config.max_minutes and elapsed > 60.0 * config.max_minutes:
            stopped = "time limit"
            break
        if budget_s and elapsed >= budget_s:
            stopped = "budget"
            break
    bar.close()
    train_seconds = elapsed_before + time.perf_counter() - t_start

    if sgmcmc:
        final_cycle = cycle_position(1.0, config.sgmcmc_cycles)[0]
        if final_cycle not in sampled_cycles:       # the last cycle ends with the run
            samples.append({k: v.detach().clone() for k, v in params.items()})
            sampled_cycles.append(final_cycle)
        from .sgmcmc import accepted_samples

        kept = samples[-config.sgmcmc_samples:]
        kept_cycles = sampled_cycles[-config.sgmcmc_samples:]
        sample_loss = torch.stack([evaluate_with(sample, split["val"]) for sample in kept])           # [S,C]
        accepted = accepted_samples(sample_loss)
        if not accepted:
            raise MLMDError("sgmcmc: every sample has a non-finite validation loss; lower --lr")
        rejected = [{"cycle": kept_cycles[s], "chain": c, "val_loss": float(sample_loss[s, c])}
                    for s in range(len(kept)) for c in range(members) if (s, c) not in accepted]
        init = dict(init, committee=len(accepted))
        model = committee_from_samples(init, [(kept[s], c) for s, c in accepted]).to(dtype)
    else:
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(best[k])
    model.eval()
    refit_energy_shift(model, graphs, split["train"])
    metrics = test_metrics(model, graphs, split["test"] or split["val"])
    metrics["split_evaluated"] = "test" if split["test"] else "val"
    data_fp = fingerprint(train_frames)
    summary = {
        "force_mae_eV_per_A": metrics["committee"]["force_mae"],
        "force_rmse_eV_per_A": metrics["committee"]["force_rmse"],
        "energy_mae_eV": metrics["committee"]["energy_mae"],
        "energy_mae_meV_per_atom": metrics["committee"]["energy_mae_per_atom"] * 1000.0,
        "member_force_mae_eV_per_A": metrics["members"]["force_mae"],
        "data_force_std_eV_per_A": init["force_std"],
        "force_mae_over_std": metrics["committee"]["force_mae"] / init["force_std"],
        "train_wall_s": train_seconds, "epochs": epoch, "stopped_by": stopped,
        "committee": model.committee_size, "posterior": config.posterior, "n_train": len(split["train"]),
        "n_val": len(split["val"]),
        "n_test": len(split["test"]),
    }
    if sgmcmc:
        summary["sgmcmc"] = {"chains": members, "samples_per_chain": config.sgmcmc_samples,
                             "cycles_sampled": sampled_cycles, "temperature": config.sgmcmc_temperature,
                             "prior_std": config.sgmcmc_prior_std,
                             "likelihood_variance": likelihood_variance.tolist(),
                             "sample_val_loss": sample_loss.tolist(), "rejected_samples": rejected}
    if "stress_mae_gpa" in metrics["committee"]:
        summary["stress_mae_GPa"] = metrics["committee"]["stress_mae_gpa"]
        summary["pressure_mae_GPa"] = metrics["committee"]["pressure_mae_gpa"]
    result = {"metrics": metrics, "test_metrics_summary": summary, "history": history}
    model_path = os.path.join(config.out, "model.pt")
    export_model(model, model_path, init, config.data, data_fp, summary, config.export_dtype, train_frames[0])
    # the members' raw spread underestimates the force error (1.3-4.4x for the shipped systems)
    calibration = calibrate_file(model_path, [frames[i] for i in split["val"]])
    if calibration:
        summary["calibration"] = calibration
    with open(os.path.join(config.out, "metrics.json"), "w") as handle:
        json.dump({"summary": summary, "config": asdict(config), "split": split, "metrics": metrics},
                  handle, indent=1)
    parity_plot(metrics, os.path.join(config.out, "parity.png"), summary)
    result["model_path"] = model_path
    return result


def test_metrics(model: PonitaPotential, graphs: Graphs, indices: List[int]) -> Dict:
    """MAE/RMSE of committee-mean and per-member predictions, plus arrays for the parity plot."""
    e_pred, e_ref, n_at, f_pred, f_ref = [], [], [], [], []
    s_pred, s_ref = [], []     # stress of frames with a stress label, GPa, [G_s,3,3]
    for lo in range(0, len(indices), 50):
        chunk = indices[lo:lo + 50]
        batch = graphs.batch(chunk)
        has_virial = batch["has_virial"]
        energies, forces, virials = predict(model, batch, False, bool(has_virial.any()))
        e_pred.append(energies.detach().double())
        f_pred.append(forces.detach().double())
        e_ref.append(batch["energy"].double())
        n_at.append(batch["n_atoms"].double())
        f_ref.append(batch["forces"].double())
        if virials is not None:
            volumes = torch.tensor([graphs.volumes[int(k)] for k in chunk], dtype=torch.float64)[has_virial]
            to_gpa = -units.EV_PER_ANGSTROM3_TO_GPA / volumes[:, None, None]
            s_pred.append(virials.detach().double().mean(0)[has_virial] * to_gpa)
            s_ref.append(batch["virial"].double()[has_virial] * to_gpa)
    e_pred = torch.cat(e_pred, dim=1)
    f_pred = torch.cat(f_pred, dim=1)
    e_ref = torch.cat(e_ref)
    f_ref = torch.cat(f_ref)
    n_at = torch.cat(n_at)

    def scores(e, f):
        de = e - e_ref
        df = f - f_ref
        return {"energy_mae": float(de.abs().mean()), "energy_rmse": float(de.pow(2).mean().sqrt()),
                "energy_mae_per_atom": float((de / n_at).abs().mean()),
                "force_mae": float(df.abs().mean()), "force_rmse": float(df.pow(2).mean().sqrt())}

    members = [scores(e_pred[m], f_pred[m]) for m in range(e_pred.shape[0])]
    committee = scores(e_pred.mean(0), f_pred.mean(0))
    if s_pred:
        ds = torch.cat(s_pred) - torch.cat(s_ref)
        committee["stress_mae_gpa"] = float(ds.abs().mean())
        committee["pressure_mae_gpa"] = float(torch.diagonal(ds, dim1=-2, dim2=-1).mean(-1).abs().mean())
    return {"committee": committee,
            "members": {k: [s[k] for s in members] for k in members[0]},
            "parity": {"energy_ref_per_atom": (e_ref / n_at).tolist(),
                       "energy_pred_per_atom": (e_pred.mean(0) / n_at).tolist(),
                       "force_ref": f_ref.flatten().tolist(), "force_pred": f_pred.mean(0).flatten().tolist()}}


def parity_plot(metrics: Dict, path: str, summary: Dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parity = metrics["parity"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    e_ref = np.asarray(parity["energy_ref_per_atom"])
    e_pred = np.asarray(parity["energy_pred_per_atom"])
    offset = e_ref.mean()
    axes[0].scatter((e_ref - offset) * 1000, (e_pred - offset) * 1000, s=8, alpha=0.7)
    lim = np.array([min(((e_ref - offset) * 1000).min(), ((e_pred - offset) * 1000).min()),
                    max(((e_ref - offset) * 1000).max(), ((e_pred - offset) * 1000).max())])
    axes[0].plot(lim, lim, "k--", lw=1)
    axes[0].set_xlabel("reference energy - mean (meV/atom)")
    axes[0].set_ylabel("predicted (meV/atom)")
    axes[0].set_title(f"energy MAE {summary['energy_mae_meV_per_atom']:.2f} meV/atom")
    f_ref = np.asarray(parity["force_ref"])
    f_pred = np.asarray(parity["force_pred"])
    axes[1].scatter(f_ref, f_pred, s=3, alpha=0.4)
    lim = np.array([min(f_ref.min(), f_pred.min()), max(f_ref.max(), f_pred.max())])
    axes[1].plot(lim, lim, "k--", lw=1)
    axes[1].set_xlabel("reference force component (eV/Å)")
    axes[1].set_ylabel("predicted (eV/Å)")
    axes[1].set_title(f"force MAE {summary['force_mae_eV_per_A']:.3f} eV/Å "
                      f"({100 * summary['force_mae_over_std']:.1f}% of data std)")
    fig.suptitle(f"mlmd committee of {summary['committee']} on {summary['n_test']} test frames")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def export_model(model: PonitaPotential, path: str, init: Dict, data_path: str, data_fingerprint: str,
                 summary: Dict, dtype: str, example=None) -> str:
    from ..potential import export

    meta = {keys.META_FAMILY: "ponita", keys.META_HYPER: init["hyperparameters"],
            keys.META_FINGERPRINT: data_fingerprint,
            keys.META_TRAINING: {"data": os.path.basename(data_path), **summary,
                                 "avg_num_neighbors": init["avg_num_neighbors"],
                                 "energy_scale": init["energy_scale"]}}
    if example is not None:
        meta[keys.META_EXAMPLE] = {"numbers": example.numbers.tolist(), "positions": example.positions.tolist(),
                                   "cell": np.asarray(example.cell).tolist(), "pbc": example.pbc.tolist()}
    return export(model, path, meta, dtype=dtype)


def export_checkpoint(checkpoint: str, out: str, dtype: Optional[str] = None) -> str:
    """Export the best (EMA) weights of a training checkpoint to a model file."""
    if not os.path.isfile(checkpoint):
        raise InputError(f"checkpoint: file {checkpoint!r} does not exist")
    try:
        state = torch.load(checkpoint, weights_only=True)
    except Exception as exc:
        raise InputError(f"checkpoint: {checkpoint!r} is not an mlmd training checkpoint ({exc})") from None
    if "model_init" not in state or "best" not in state:
        raise InputError(f"checkpoint: {checkpoint!r} is not an mlmd training checkpoint")
    if state["config"].get("posterior", "ensemble") == "sgmcmc":
        raise InputError(f"checkpoint: {checkpoint!r} is from an sgmcmc run, whose committee is its end-of-cycle "
                         "samples: train writes them to OUT/model.pt when it finishes (the checkpoint holds only "
                         "the chains' current weights)")
    init = state["model_init"]
    config = state["config"]
    model = build_model(init)
    model.load_state_dict({**model.state_dict(), **state["best"]})
    frames = read_dataset(config["data"])
    train_frames = [frames[i] for i in state["split"]["train"]]
    model.eval()
    graphs = Graphs(train_frames, list(init["species"]), float(model.cutoff), next(model.parameters()).dtype)
    refit_energy_shift(model, graphs, list(range(len(train_frames))))   # as train() does before export
    summary = {"epochs": int(state["epoch"])}
    export_model(model, out, init, config["data"], fingerprint(train_frames), summary,
                 dtype or config["export_dtype"], train_frames[0])
    calibrate_file(out, [frames[i] for i in state["split"]["val"]])
    return out
