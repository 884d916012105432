"""Retraining hooks: what runs when the committee asks for labels.

A hook is any object with ``on_candidates(frames) -> model or None``: ``frames`` are
ase.Atoms whose ``info`` carries the provenance (host, step, time_fs, sigma, model), and the
return value, a model file path or an :class:`mlmd.Potential`, is swapped into the running
simulation between two steps (None: keep the current model).

:class:`RetrainingHook` is the built-in one: label with an oracle (fanned out through Dask
when a client is given), append each label to ``WORKDIR/labels.extxyz`` the moment it
arrives, fine-tune every member from its current weights on the initial training frames plus
the new labels, recalibrate σ on the validation frames, export ``WORKDIR/models/
generation_NNN.pt`` and return it.  Every ``val_every``-th label goes to validation instead of
training, so the calibration keeps seeing frames like the ones the run visits.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Sequence

from .. import keys
from ..errors import InputError
from ..potential import Potential, as_potential
from .finetune import FinetuneConfig, finetune_committee, trainable_from_potential
from .labeling import label_frames

SPLIT = "active_split"           # atoms.info: "train" | "val"
GENERATION = "active_generation"  # atoms.info: the generation the label was made for


class RetrainingHook:
    """Label → append → fine-tune every member → recalibrate → export → return the new model.

    model        the committee the run starts with (path or Potential; mlmd's PONITA family)
    oracle       a name from :data:`mlmd.active.oracles.ORACLES` or an ASE calculator
    workdir      folder for labels.extxyz, label_failures.jsonl, models/, state.json; a hook
                 made on an existing workdir resumes (labels already there are kept and used)
    train_data   labelled frames (list or extxyz path) the model was trained on; fine-tuning
                 always sees them too, so the model does not forget what it knew
    val_data     labelled frames for the calibration (held out from training)
    client       distributed.Client for labelling and member training, None: in process
    finetune     :class:`FinetuneConfig`
    val_every    every this-many-th new label goes to validation (0: none)
    timeout      seconds an oracle may take per frame (in process) or per batch (Dask)
    """

    def __init__(self, model, oracle, workdir: str, train_data=None, val_data=None, client=None,
                 finetune: Optional[FinetuneConfig] = None, val_every: int = 5,
                 timeout: Optional[float] = None):
        from .oracles import make_oracle

        self.potential = as_potential(model)
        trainable_from_potential(self.potential)           # fail now, not at the first retraining
        make_oracle(oracle)                                 # same for a bad oracle name
        if isinstance(val_every, bool) or not isinstance(val_every, int) or val_every < 0:
            raise InputError(f"val_every: must be an integer >= 0, got {val_every!r}")
        self.oracle = oracle
        self.workdir = os.fspath(workdir)
        self.client = client
        self.finetune = finetune or FinetuneConfig()
        self.finetune.validate()
        self.val_every = val_every
        self.timeout = timeout
        self.train_frames = _frames(train_data, "train_data")
        self.val_frames = _frames(val_data, "val_data")
        os.makedirs(os.path.join(self.workdir, "models"), exist_ok=True)
        self.labels_path = os.path.join(self.workdir, "labels.extxyz")
        self.failures_path = os.path.join(self.workdir, "label_failures.jsonl")
        self.state_path = os.path.join(self.workdir, "state.json")
        # paths in state.json are relative to workdir when inside it: a moved run folder restarts
        self.state: Dict = {"generation": 0, "model": self._stored(self.potential.path), "trained_labels": 0,
                            "labels": 0, "failures": 0, "history": []}
        if os.path.isfile(self.state_path):
            with open(self.state_path) as handle:
                self.state.update(json.load(handle))
            self.potential = as_potential(self._resolved(self.state["model"]))
        self.labels: List = self._read_labels()
        self.state["labels"] = len(self.labels)

    # ---- what the learner asks --------------------------------------------------------------
    @property
    def generation(self) -> int:
        return int(self.state["generation"])

    @property
    def untrained(self) -> int:
        """Labels on disk that no exported generation was trained on (after a kill)."""
        return len(self.labels) - int(self.state["trained_labels"])

    def on_candidates(self, frames: Sequence) -> Optional[Potential]:
        """Label ``frames``, retrain, return the new committee (None if no label succeeded
        and nothing was left untrained)."""
        frames = list(frames)
        start = time.perf_counter()
        new = label_frames(frames, self.oracle, client=self.client, timeout=self.timeout,
                           on_label=self._append_label, failure_log=self.failures_path)
        failed = sum(1 for label in new if not label.ok)
        self.state["failures"] = int(self.state.get("failures", 0)) + failed
        label_seconds = time.perf_counter() - start
        if self.untrained == 0:
            self._save_state()
            return None
        return self.retrain(requested=len(frames), failed=failed, label_seconds=label_seconds)

    __call__ = on_candidates

    def retrain(self, requested: int = 0, failed: int = 0, label_seconds: float = 0.0,
                finetune: Optional[FinetuneConfig] = None) -> Potential:
        """Fine-tune on everything labelled so far, recalibrate, export the next generation.

        ``finetune`` overrides the hook's settings for this one retraining (e.g. a longer final
        refit after the run, when MD no longer waits for it)."""
        from ..models.data import fingerprint
        from ..potential import export
        from ..uncertainty import calibrate_file

        start = time.perf_counter()
        train, val = self.split_frames()
        if not train:
            raise InputError("train_data: nothing to fine-tune on; give the frames the model was trained on")
        model, init, stats = finetune_committee(self.potential, train, finetune or self.finetune,
                                                  client=self.client)
        generation = self.generation + 1
        meta = {k: v for k, v in self.potential.metadata.items()
                if k not in (keys.META_CALIBRATION, keys.META_DTYPE, keys.META_CUTOFF, keys.META_SPECIES,
                             keys.META_COMMITTEE, keys.META_STRESS)}
        meta[keys.META_FINGERPRINT] = fingerprint(train)
        meta[keys.META_TRAINING] = dict(self.potential.metadata.get(keys.META_TRAINING, {}),
                                        active_generation=generation, n_train=len(train), n_val=len(val))
        path = os.path.join(self.workdir, "models", f"generation_{generation:03d}.pt")
        dtype = self.potential.metadata[keys.META_DTYPE]
        export(model, path, meta, dtype=dtype)
        calibration = calibrate_file(path, val)
        potential = as_potential(path)
        record = {"generation": generation, "model": self._stored(path), "labels": len(self.labels),
                  "requested": requested, "failed": failed, "train_frames": len(train), "val_frames": len(val),
                  "label_s": round(label_seconds, 2), "train_s": round(time.perf_counter() - start, 2),
                  "loss_first": [m["loss_first"] for m in stats["members"]],
                  "loss_last": [m["loss_last"] for m in stats["members"]],
                  "time": time.time()}
        if calibration:
            record["calibration"] = calibration
        self.potential = potential
        self.state.update(generation=generation, model=self._stored(path), trained_labels=len(self.labels))
        self.state["history"].append(record)
        self._save_state()
        return potential

    def split_frames(self):
        """(training frames, validation frames): the initial ones plus the labels of each split."""
        return (self.train_frames + [a for a in self.labels if a.info.get(SPLIT) == "train"],
                self.val_frames + [a for a in self.labels if a.info.get(SPLIT) == "val"])

    # ---- files --------------------------------------------------------------------------------
    def _append_label(self, label) -> None:
        from ..models.data import append_frames

        frame = label.frame
        count = len(self.labels) + 1
        frame.info[SPLIT] = "val" if self.val_every and count % self.val_every == 0 else "train"
        frame.info[GENERATION] = self.generation
        append_frames(self.labels_path, [frame])     # one write + fsync per label
        self.labels.append(frame)
        self.state["labels"] = len(self.labels)

    def _stored(self, path: str) -> str:
        """How state.json records ``path``: relative to workdir when inside it, else absolute."""
        if not path:
            return path
        path, workdir = os.path.abspath(path), os.path.abspath(self.workdir)
        return os.path.relpath(path, workdir) if os.path.commonpath([path, workdir]) == workdir else path

    def _resolved(self, stored: str) -> str:
        if os.path.isabs(stored):
            return stored
        inside = os.path.join(self.workdir, stored)
        # state.json files of earlier versions hold paths relative to the working directory
        return inside if os.path.exists(inside) or not os.path.exists(stored) else stored

    def _read_labels(self) -> List:
        if not os.path.isfile(self.labels_path) or os.path.getsize(self.labels_path) == 0:
            return []
        from ..models.data import read_dataset
        return read_dataset(self.labels_path)

    def _save_state(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(self.state, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.state_path)


def _frames(data, name: str) -> List:
    if data is None:
        return []
    if isinstance(data, (str, os.PathLike)):
        from ..models.data import read_dataset
        return read_dataset(data)
    frames = list(data)
    for index, atoms in enumerate(frames):
        results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
        if keys.DATA_ENERGY not in results or keys.DATA_FORCES not in results:
            raise InputError(f"{name}: frame {index} has no energy/forces labels; pass labelled frames "
                             "(an extxyz written by `mlmd label`)")
    return frames
