"""``mlmd learn CONFIG``: MD in the internal engine with the learning loop on, resumable.

A config is a ``mlmd run`` config plus the loop's keys (paths relative to the file)::

    structure: ethanol.xyz
    model: initial_committee.pt
    oracle: gfn2-xtb                # gfn2-xtb | gfn1-xtb | emt, or an OpenMM force field:
                                    #   {openmm: {topology: water.pdb, forcefield: [amber14/tip3pfb.xml]}}
    train_data: train.extxyz        # the frames the model was trained on (kept in fine-tuning)
    val_data: val.extxyz            # held-out frames for the σ calibration (optional)
    integrator: langevin
    temperature: 600
    timestep: 0.5
    steps: 20000
    sigma_lo: 0.15                  # eV/Å, calibrated max atomic force σ: below, trusted
    sigma_hi: 1.5                   # eV/Å: at or above, lost (roll back)
    labels_per_ns: 2000             # budget (0: none)
    batch_size: 4                   # candidates per retraining
    pool: 1                         # >1: label batch_size of every batch_size × pool candidates,
    select: sigma                   #     the most uncertain (sigma) or far apart (diverse)
    check_interval: 10              # steps between two looks at σ
    mode: sync                      # sync | async
    finetune: {epochs: 30}          # each retraining (FinetuneConfig: epochs, lr 2e-3, batch_size, ...)
    final_finetune: {epochs: 300, lr: 0.01}   # optional: one longer refit after MD, the final model
    dask: none                      # none | local | tcp://scheduler:8786
    output: runs/learn

writes what ``mlmd run`` writes plus ``active/`` (labels.extxyz, label_failures.jsonl,
models/generation_NNN.pt, state.json) and ``learn.csv``.  A checkpoint is written with every
trajectory frame and after every swap; ``--restart`` after a kill continues from it with the
newest model, first retraining on labels that were written but not yet trained on, so no
label and no trajectory frame is lost.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..errors import InputError
from ..md.run import RunConfig, run
from .finetune import FinetuneConfig

LEARN_CONFIG_NAME = "learn.yaml"


@dataclass
class LearnConfig(RunConfig):
    oracle: Any = "gfn2-xtb"           # a name, or {"openmm": {...}} (OpenMMForceField's arguments)
    train_data: Optional[str] = None
    val_data: Optional[str] = None
    sigma_lo: float = 0.15
    sigma_hi: float = 1.5
    labels_per_ns: float = 0.0
    burst: int = 8
    batch_size: int = 4
    pool: int = 1                        # label batch_size of every batch_size × pool candidates
    select: str = "sigma"                # ... the most uncertain ("sigma") or far apart ("diverse")
    dedup_rmsd: float = 0.05
    check_interval: int = 10
    mode: str = "sync"
    rollback: bool = True
    dask: Optional[str] = None
    workers: int = 2
    oracle_timeout: Optional[float] = None
    val_every: int = 5
    finetune: Dict[str, Any] = field(default_factory=dict)
    final_finetune: Dict[str, Any] = field(default_factory=dict)   # {} none; else a longer refit after MD
    output: str = "runs/learn"
    checkpoint_interval: int = 100       # = trajectory_interval by default: no frame without a checkpoint

    CONFIG_NAME = LEARN_CONFIG_NAME
    PATH_KEYS = ("structure", "model", "train_data", "val_data")

    @classmethod
    def resolve_nested_paths(cls, raw: Dict[str, Any], base: str) -> None:
        spec = raw.get("oracle")
        if isinstance(spec, dict) and isinstance(spec.get("openmm"), dict):
            topology = spec["openmm"].get("topology")
            if isinstance(topology, str) and not os.path.isabs(topology):
                spec["openmm"]["topology"] = os.path.join(base, topology)

    def validate(self, source: str = "config") -> None:
        super().validate(source)
        from ..uncertainty import TrustLevels
        from .loop import MODES
        from .oracles import ORACLES, make_oracle

        if isinstance(self.oracle, dict):
            try:
                make_oracle(self.oracle)
            except InputError as exc:
                raise InputError(f"{source}: {exc}") from None
        elif self.oracle not in ORACLES or self.oracle == "openmm":
            raise InputError(f"{source}: oracle: must be one of {ORACLES[:-1]} or "
                             f"{{openmm: {{topology: FILE.pdb, forcefield: [amber14/tip3pfb.xml]}}}}, "
                             f"got {self.oracle!r}")
        for key in ("train_data", "val_data"):
            value = getattr(self, key)
            if value is not None and not os.path.isfile(value):
                raise InputError(f"{source}: {key}: file {value!r} does not exist")
        from ..uncertainty import Trigger
        try:
            Trigger(TrustLevels(self.sigma_lo, self.sigma_hi), labels_per_ns=self.labels_per_ns, burst=self.burst,
                    dedup_rmsd=self.dedup_rmsd, batch_size=self.batch_size, pool=self.pool, select=self.select)
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None
        if self.burst < 0:
            raise InputError(f"{source}: burst: must be a whole number >= 0, got {self.burst!r}")
        if self.mode not in MODES:
            raise InputError(f"{source}: mode: must be one of {MODES}, got {self.mode!r}")
        if self.check_interval < 1:
            raise InputError(f"{source}: check_interval: must be a whole number >= 1, got {self.check_interval!r}")
        if self.val_every < 0:
            raise InputError(f"{source}: val_every: must be a whole number >= 0 (0: no validation labels), "
                             f"got {self.val_every!r}")
        if self.workers < 1:
            raise InputError(f"{source}: workers: must be a whole number >= 1 (a Dask cluster without workers "
                             f"never labels anything), got {self.workers!r}")
        if self.dask not in (None, "none", "local") and "://" not in self.dask:
            raise InputError(f"{source}: dask: expected none, local or a scheduler address like "
                             f"tcp://host:8786, got {self.dask!r}")
        if self.oracle_timeout is not None and not (math.isfinite(self.oracle_timeout) and self.oracle_timeout > 0):
            raise InputError(f"{source}: oracle_timeout: must be a positive number of seconds (or left out for "
                             f"none), got {self.oracle_timeout!r}")
        if self.trajectory_interval % self.checkpoint_interval:
            raise InputError(f"{source}: checkpoint_interval: must divide trajectory_interval "
                             f"({self.trajectory_interval}) so that every trajectory frame is covered by a "
                             f"checkpoint, got {self.checkpoint_interval}")
        for key in ("finetune", "final_finetune"):
            unknown = set(getattr(self, key)) - set(FinetuneConfig.__dataclass_fields__)
            if unknown:
                raise InputError(f"{source}: {key}: unknown key(s) {sorted(unknown)}; known: "
                                 f"{sorted(FinetuneConfig.__dataclass_fields__)}")
            try:
                FinetuneConfig(**getattr(self, key)).validate(prefix=f"{key}.")
            except InputError as exc:
                raise InputError(f"{source}: {exc}") from None

    def output_paths(self):
        return super().output_paths() + [os.path.join(self.output, "learn.csv"),
                                         os.path.join(self.output, "active")]


class LearningExtension:
    """The learning loop as an extension of :func:`mlmd.md.run.run`."""

    #: the model of a restart is the loop's newest generation, checked here against the checkpoint
    models_checked = True

    def __init__(self, config: LearnConfig):
        self.config = config
        self.learner = None
        self.host = None
        self.client = None

    def start(self, sim, extra: Optional[Dict], checkpoint):
        from ..uncertainty import Trigger, TrustLevels
        from .hooks import RetrainingHook
        from .hosts import EngineHost
        from .labeling import make_client
        from .loop import ActiveLearner

        c = self.config
        self.client = make_client(c.dask, c.workers) if c.dask else None
        workdir = os.path.join(c.output, "active")
        hook = RetrainingHook(c.model, c.oracle, workdir, train_data=c.train_data, val_data=c.val_data,
                              client=self.client, finetune=FinetuneConfig(**c.finetune), val_every=c.val_every,
                              timeout=c.oracle_timeout)
        trigger = Trigger(TrustLevels(c.sigma_lo, c.sigma_hi), labels_per_ns=c.labels_per_ns, burst=c.burst,
                          dedup_rmsd=c.dedup_rmsd, batch_size=c.batch_size, pool=c.pool,
                          select=c.select)
        self.learner = ActiveLearner(hook, trigger, mode=c.mode, rollback=c.rollback,
                                     log=os.path.join(c.output, "learn.csv"), seed=c.seed,
                                     on_swap=lambda *_: checkpoint())
        self.host = EngineHost(sim)
        if extra is not None:                      # a restart: the newest model, the loop's counters
            self._check_model_in_use(extra)
            trigger.load_state_dict(extra.get("trigger", {}))
            self.learner.stats.update(extra.get("learner", {}))
            trigger.recent.extend(hook.labels[-trigger.recent.maxlen:])   # candidates already labelled stay known
            # learn.csv is appended to: rows after this line replay steps logged before the kill
            self.learner._event(self.host, "restart", f"from the checkpoint of step {sim.state.step}, "
                                f"{len(hook.labels)} labels, {hook.untrained} not yet trained on")
            if hook.untrained:
                hook.retrain()
            if os.path.abspath(hook.potential.path) != os.path.abspath(sim.potential.path):
                self.host.swap(hook.potential)
            checkpoint()
        return [(self.learner.observer(self.host), c.check_interval)]

    def _check_model_in_use(self, extra: Dict) -> None:
        """The model the checkpoint ran with must still be the file it was (by SHA-256)."""
        from ..md.simulation import model_sha256

        recorded, sha = extra.get("model_in_use", ""), extra.get("model_in_use_sha256", "")
        if not recorded or not sha:
            return
        path = recorded if os.path.isabs(recorded) else os.path.join(self.config.output, recorded)
        now = model_sha256(path)
        if now != sha:
            raise InputError(f"restart: the checkpoint ran with the model file {path!r} (SHA-256 {sha[:12]}...), "
                             + ("which is missing" if not now else f"which has changed (SHA-256 {now[:12]}...)")
                             + "; restore it, or start a new run into another output folder")

    def state(self) -> Dict:
        if self.learner is None:
            return {}
        from ..md.simulation import model_sha256

        stats = {k: v for k, v in self.learner.stats.items()}
        path = self.host.potential.path if self.host else ""
        return {"trigger": self.learner.trigger.state_dict(), "learner": stats,
                "model_in_use": _relative_to(path, self.config.output),
                "model_in_use_sha256": model_sha256(self.host.potential) if self.host else ""}

    def finish(self, sim, aborted: bool = False) -> None:
        """Swap in a finished async model, run the final refit; ``aborted`` (Ctrl-C, a failure):
        neither waits for an async retraining nor refits (labels on disk are trained on at the
        restart)."""
        if self.learner is not None and aborted:
            self.learner.abandon()
        elif self.learner is not None:
            self.learner.finish(self.host)
            hook = self.learner.hook
            if self.config.final_finetune and hook.labels:
                # MD is over and nothing waits: one longer refit on everything labelled
                final = FinetuneConfig(**dict(self.config.finetune, **self.config.final_finetune))
                self.learner._event(self.host, "final refit", f"{len(hook.labels)} labels, {final.epochs} epochs "
                                    f"at lr {final.lr:g}")
                hook.retrain(finetune=final)
                self.learner.close()
        if self.client is not None:
            # a LocalCluster made for this run is not closed with its client; left open, its
            # worker processes keep the interpreter from exiting
            cluster = getattr(self.client, "cluster", None) if self.config.dask == "local" else None
            self.client.close()
            if cluster is not None:
                cluster.close()
            self.client = None

    def summary(self) -> Dict:
        if self.learner is None:
            return {}
        hook = self.learner.hook
        return {"labels": len(hook.labels), "labels_requested": self.learner.stats["labels_requested"],
                "retrainings": self.learner.stats["retrainings"], "rollbacks": self.learner.stats["rollbacks"],
                "generation": hook.generation, "model": hook.potential.path,
                "label_failures": int(hook.state.get("failures", 0)), "checks": dict(self.learner.trigger.counts)}


def _relative_to(path: str, folder: str) -> str:
    """``path`` relative to ``folder`` when inside it (a moved run folder still restarts), else absolute."""
    if not path:
        return path
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.relpath(path, folder) if os.path.commonpath([path, folder]) == folder else path


def learn(config: LearnConfig, restart: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Run ``mlmd learn``; returns the run summary with the loop's counts."""
    return run(config, restart=restart, progress=progress, extension=LearningExtension(config))
