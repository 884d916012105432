"""Fine-tuning a committee from its current weights on an enlarged data set.

Works from a model file: a PONITA file carries its hyper-parameters, species, energy scale
and neighbour normalisation in its metadata and its weights in the TorchScript archive, so
the eager model is rebuilt exactly (:func:`trainable_from_potential`).  Members are
independent, so their fine-tuning fans out (one Dask task per member) and is stitched back
into one committee (:func:`merge_members`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import keys
from ..errors import InputError


@dataclass
class FinetuneConfig:
    epochs: int = 30
    lr: float = 2e-3               # 5e-4 learned 600 K ethanol too slowly; 5e-3 in short runs hurt converged Cu
    warmup_fraction: float = 0.2   # linear warm-up: a fresh AdamW state takes large first steps
    batch_size: int = 8
    energy_weight: float = 1.0
    force_weight: float = 10.0
    stress_weight: float = 1.0
    weight_decay: float = 1e-5
    seed: int = 0

    def validate(self, prefix: str = "finetune.") -> None:
        from ..validate import check_field_types

        check_field_types(self, source="", prefix=prefix)   # lr: "1e-3" is text, not a number
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{prefix}{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "energy_weight", "force_weight", "stress_weight", "weight_decay", "warmup_fraction"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise InputError(f"{prefix}{name}: must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                                 f"got {value}")


def trainable_from_potential(potential) -> Tuple[torch.nn.Module, Dict]:
    """The eager PonitaPotential (float32, train-ready) inside a model file, and its ``init``
    dict (what :func:`mlmd.models.train.build_model` takes)."""
    from ..models.train import build_model

    meta = potential.metadata
    if meta.get(keys.META_FAMILY) != "ponita":
        raise InputError(f"model: fine-tuning needs a model file of mlmd's own family 'ponita', this one is "
                         f"{meta.get(keys.META_FAMILY)!r}; retrain it with `mlmd train`")
    training = meta.get(keys.META_TRAINING, {})
    for name in ("energy_scale", "avg_num_neighbors"):
        if name not in training:
            raise InputError(f"model: the file's metadata lacks training.{name}; re-export it with this mlmd")
    # float weights to float32 for training; the integer buffers (species map, the sphere's constants) as they are
    state = {k[len("model."):]: (v.detach().clone().float() if v.is_floating_point() else v.detach().clone())
             for k, v in potential.module.state_dict().items() if k.startswith("model.")}
    init = {"species": [int(z) for z in meta[keys.META_SPECIES]], "committee": int(meta[keys.META_COMMITTEE]),
            "seed": 0, "hyperparameters": dict(meta[keys.META_HYPER]),
            "energy_shift": state["energy_shift"].tolist(), "energy_scale": float(training["energy_scale"]),
            "avg_num_neighbors": float(training["avg_num_neighbors"]),
            "force_std": float(training.get("data_force_std_eV_per_A", training["energy_scale"]))}
    model = build_model(init)
    # the weights and E0 come from the file; the sphere's constants follow from the hyper-parameters
    learned = [name for name, _ in model.named_parameters()] + ["energy_shift"]
    missing = [name for name in learned if name not in state]
    if missing:
        raise InputError(f"model: the file lacks the weights {missing[:3]} of this model family; "
                         "retrain it with `mlmd train`")
    model.load_state_dict({name: state[name] for name in learned}, strict=False)
    return model, init


def member_state(model: torch.nn.Module, members: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The state dict of the members ``members`` (every parameter has the member axis first;
    buffers are shared)."""
    index = torch.as_tensor(list(members), dtype=torch.long)
    names = {name for name, _ in model.named_parameters()}
    return {k: (v.detach().index_select(0, index).clone() if k in names else v.detach().clone())
            for k, v in model.state_dict().items()}


def merge_members(model: torch.nn.Module, parts: Sequence[Tuple[Sequence[int], Dict[str, torch.Tensor]]]) -> None:
    """Write the fine-tuned member slices back into ``model`` in place."""
    names = {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        state = model.state_dict()
        for members, part in parts:
            index = torch.as_tensor(list(members), dtype=torch.long)
            for k in names:
                state[k].index_copy_(0, index, part[k].to(state[k].dtype))


def finetune_members(init: Dict, state: Dict[str, torch.Tensor], frames: Sequence, members: Sequence[int],
                     config: FinetuneConfig, threads: int = 0) -> Tuple[List[int], Dict[str, torch.Tensor], Dict]:
    """Fine-tune the member slice ``state`` (members ``members`` of a committee described by
    ``init``) on labelled ``frames``, from its current weights; returns (members, new state,
    {"loss_first", "loss_last", "seconds"}).  A plain function of data, so it runs in a Dask
    worker as well as in process.

    AdamW at ``lr`` with a linear warm-up and a cosine decay to 1 % over ``epochs``,
    the training loss of :mod:`mlmd.models.train`; each member uses its own shuffling seed.
    """
    import time

    from ..models.train import Graphs, TrainConfig, build_model, optimizer_step

    config.validate()
    if threads:
        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    members = [int(m) for m in members]
    sub_init = dict(init, committee=len(members))
    model = build_model(sub_init)
    model.load_state_dict(state)
    model.train()
    graphs = Graphs(list(frames), list(init["species"]), float(init["hyperparameters"]["cutoff"]), torch.float32)
    loss_config = TrainConfig(data="", out="", energy_weight=config.energy_weight,
                              force_weight=config.force_weight, stress_weight=config.stress_weight)
    scale = float(init["energy_scale"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(graphs) / config.batch_size)
    total = max(1, config.epochs * steps_per_epoch)
    # Adam's first steps move every weight by about lr whatever the gradient: never skip the ramp
    warmup = max(10, int(config.warmup_fraction * total))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(int(config.seed) * 7919 + sum(m * 104729 for m in members))
    losses = []
    for _ in range(config.epochs):
        order = torch.randperm(len(graphs), generator=generator)
        running = 0.0
        for lo in range(0, len(order), config.batch_size):
            batch = graphs.batch(order[lo:lo + config.batch_size].tolist())
            running += optimizer_step(model, batch, scale, loss_config, None, optimizer, scheduler) / len(members)
        losses.append(running / steps_per_epoch)
    model.eval()
    new_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return members, new_state, {"loss_first": losses[0], "loss_last": losses[-1],
                                "seconds": time.perf_counter() - start}


def finetune_committee(potential_or_model, frames: Sequence, config: FinetuneConfig, client=None,
                       init: Optional[Dict] = None) -> Tuple[torch.nn.Module, Dict, Dict]:
    """Fine-tune every member of a committee; returns (model, init, stats).

    ``client``: a distributed.Client to train one member per task (each with one torch
    thread), None: all members at once in this process (the batched committee pass).
    The per-element reference energies are refitted in closed form afterwards, on all frames.
    """
    from ..models.train import Graphs, refit_energy_shift

    if init is None:
        model, init = trainable_from_potential(potential_or_model)
    else:
        model = potential_or_model
    frames = list(frames)
    if not frames:
        raise InputError("frames: fine-tuning needs at least one labelled frame")
    members = list(range(int(init["committee"])))
    if client is None:
        parts = [finetune_members(init, member_state(model, members), frames, members, config)]
    else:
        futures = [client.submit(finetune_members, init, member_state(model, [m]), frames, [m], config, 1,
                                 pure=False) for m in members]
        from .labeling import DaskWaitTimeout, completed

        try:
            for _ in completed(client, futures):     # bounded waits: no workers, Ctrl-C
                pass
        except DaskWaitTimeout as exc:
            for future in futures:
                future.cancel()
            raise InputError(f"dask: fine-tuning the committee: {exc}") from None
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        parts = client.gather(futures)
    merge_members(model, [(p[0], p[1]) for p in parts])
    model.eval()
    graphs = Graphs(frames, list(init["species"]), float(model.cutoff), torch.float32)
    refit_energy_shift(model, graphs, list(range(len(frames))))
    init = dict(init, energy_shift=model.energy_shift.tolist())
    stats = {"members": [p[2] for p in parts], "frames": len(frames)}
    return model, init, stats
