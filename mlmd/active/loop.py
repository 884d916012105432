"""The on-the-fly learning loop: watch σ, collect candidates, call the hook, swap, roll back.

    learner = ActiveLearner(RetrainingHook(model, "gfn2-xtb", "run/active", train_data=...),
                            Trigger(TrustLevels(0.15, 1.0), labels_per_ns=2000))
    sim.attach(learner.observer(EngineHost(sim)), interval=10)        # internal engine
    dyn.attach(learner.observer(ASEHost(dyn)), interval=10)           # ASE
    simulation.reporters.append(ActiveLearningReporter(learner, 10, model, topology))  # OpenMM

Every check classifies the current frame (:class:`~mlmd.uncertainty.TrustLevels`):

- trusted: the host's snapshot goes into the rollback ring buffer (so does the state of the
  first check, where MD started or restarted, unless it is lost: a run whose committee was never
  trusted rolls back to its start rather than going on lost);
- candidate: the frame (with provenance: host, step, time, σ, model) is offered to the trigger;
  when a batch is ready the hook runs — ``mode="sync"``: MD waits, the new model is swapped in
  at once; ``mode="async"``: the hook runs in a background thread (its labelling and training
  in Dask workers when it has a client) and MD goes on with the old model until the new one is
  ready, then it is swapped in at the next check;
- lost (σ ≥ σ_hi, NaN or Inf, or an atom without any neighbour within the cutoff, about which
  a committee cannot disagree): the hook runs on the candidates collected so far (or on the lost
  frame itself when there are none), MD waits for the new model, and the state rolls back to
  the last trusted snapshot.  A rollback after which the hook gave no new model reseeds the
  thermostat so the same path is not replayed; ``max_rollbacks`` in a row without a trusted
  frame in between stop the run with an error instead of looping.
"""
from __future__ import annotations

import csv
import concurrent.futures
import math
import os
import time
from typing import List, Optional

from .. import keys
from ..errors import InputError, MLMDError
from ..uncertainty import CANDIDATE, TRUSTED, RingBuffer, Trigger, frame_scores

MODES = ("sync", "async")


class ModelLostError(MLMDError, RuntimeError):
    """The committee stayed lost after ``max_rollbacks`` rollbacks: MD cannot go on safely."""


class ActiveLearner:
    """Couples a hook and a trigger to a host (see module docstring).

    hook           object with ``on_candidates(frames) -> model|None`` (e.g. RetrainingHook)
    trigger        :class:`~mlmd.uncertainty.Trigger`
    mode           "sync" | "async"
    rollback       roll back to the last trusted state when lost
    buffer_size    trusted snapshots kept
    log            CSV path: one row per check and one per event (retrain, swap, rollback)
    max_rollbacks  consecutive rollbacks without a trusted frame before giving up
    on_swap        optional callable(host) after every swap and rollback (mlmd learn checkpoints there)
    """

    def __init__(self, hook, trigger: Trigger, mode: str = "sync", rollback: bool = True, buffer_size: int = 8,
                 log: Optional[str] = None, max_rollbacks: int = 5, seed: int = 0, on_swap=None):
        if not hasattr(hook, "on_candidates"):
            raise InputError("hook: needs an on_candidates(frames) method returning a model or None")
        if not isinstance(trigger, Trigger):
            raise InputError(f"trigger: expected an mlmd.uncertainty.Trigger, got {type(trigger).__name__}")
        if mode not in MODES:
            raise InputError(f"mode: expected one of {MODES}, got {mode!r}")
        self.hook = hook
        self.trigger = trigger
        self.mode = mode
        self.rollback = bool(rollback)
        self.buffer = RingBuffer(buffer_size)
        self.max_rollbacks = int(max_rollbacks)
        self.seed = int(seed)
        self.on_swap = on_swap
        self.stats = {"checks": 0, "labels_requested": 0, "retrainings": 0, "swaps": 0, "rollbacks": 0,
                      "lost": 0, "hook_seconds": 0.0}
        self._lost_in_a_row = 0
        self._isolated: List[int] = []
        self._seen_a_state = False        # the first state checked (after a start or a restart)
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._future: Optional[concurrent.futures.Future] = None
        self._log_path = os.fspath(log) if log else None
        self._log_handle = None
        self._writer = None

    # ---- host side ----------------------------------------------------------------------------
    def observer(self, host):
        """A callable for the host's observer mechanism (engine ``attach``, ASE ``dyn.attach``)."""
        def observe(*_):
            self.check(host)
        return observe

    def check(self, host) -> str:
        """Classify the host's current frame and act on it; returns the class."""
        self.stats["checks"] += 1
        self._collect_async(host)
        output = host.output()
        calibration = float(host.potential.metadata.get(keys.META_CALIBRATION, 1.0) or 1.0)
        scores = frame_scores(output, calibration)
        score = scores["score"]
        note = ""
        isolated = host.isolated_atoms() if hasattr(host, "isolated_atoms") else ()
        self._isolated = [int(i) for i in isolated[:20]]
        if len(isolated):
            # a committee cannot disagree about an atom without neighbours (σ = 0): not evidence of trust
            score = math.inf
            note = f"no neighbour within the cutoff: atoms {[int(i) for i in isolated[:20]]}"
        kind = self.trigger.levels.classify(score)
        self.trigger.counts[kind] += 1
        self._log(host, kind, score, scores["energy_sigma"], note)
        first, self._seen_a_state = not self._seen_a_state, True
        if kind == TRUSTED:
            self._lost_in_a_row = 0
            self.buffer.push(host.snapshot())
        elif kind == CANDIDATE:
            if first:
                self.buffer.push(host.snapshot())
            self.trigger.offer(self._frame(host, score), host.time_fs)
            if self.trigger.ready:
                self._run_hook(host, self.trigger.take(), wait=self.mode == "sync")
        else:
            self._lost(host, score)
        return kind

    def close(self) -> None:
        """Wait for a running async retraining and close the log."""
        if self._future is not None:
            self._future.result()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
            self._writer = None         # a later event reopens the log in append mode

    def abandon(self) -> None:
        """Stop without waiting (Ctrl-C, a failure): an async retraining still running is left to
        finish in its thread, unused (its labels are on disk and trained on at the restart)."""
        if self._future is not None:
            self._future.cancel()
            self._future = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
            self._writer = None

    def finish(self, host) -> None:
        """Swap in a model still being trained (async) and close."""
        if self._future is not None:
            self._swap(host, self._wait_future(), "async retraining finished")
        self.close()

    # ---- internals ----------------------------------------------------------------------------
    def _frame(self, host, score: float):
        atoms = host.frame()
        atoms.info.update({"active_host": host.name, "sample_step": host.step,
                           "active_time_fs": round(host.time_fs, 6), "active_sigma": float(score),
                           "active_model": os.path.basename(getattr(host.potential, "path", "") or "")})
        return atoms

    def _lost(self, host, score: float) -> None:
        self.stats["lost"] += 1
        new_model = None
        if self._future is not None:
            new_model = self._wait_future()
        else:
            batch = self.trigger.take()
            if not batch and self.trigger.offer(self._frame(host, score), host.time_fs):
                batch = self.trigger.take()
            if batch:
                new_model = self._call_hook(batch)
        if new_model is not None:
            self._swap(host, new_model, "lost: retrained")
        if not self.rollback:
            return
        self._lost_in_a_row += 1
        if self._lost_in_a_row > self.max_rollbacks:
            why = (f"atoms {self._isolated} have no neighbour within the cutoff" if self._isolated else
                   f"σ ≥ sigma_hi = {self.trigger.levels.sigma_hi} eV/Å")
            raise ModelLostError(
                f"the committee stayed lost ({why}) after "
                f"{self.max_rollbacks} rollbacks at step {host.step}; raise labels_per_ns or sigma_hi, "
                "or lower the temperature")
        snapshot = self.buffer.last()
        if snapshot is None:
            return
        host.restore(snapshot)
        if new_model is None:
            host.reseed(self.seed + 7919 * self.stats["rollbacks"] + 1)
        self.stats["rollbacks"] += 1
        self._event(host, "rollback", f"to the state of step {snapshot['step']}")
        if self.on_swap is not None:
            self.on_swap(host)

    def _run_hook(self, host, batch: List, wait: bool) -> None:
        if wait:
            new_model = self._call_hook(batch)
            if new_model is not None:
                self._swap(host, new_model, "retrained")
            return
        if self._future is not None:        # one retraining at a time: keep these for the next
            self.trigger.give_back(batch)
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlmd-learn")
        self._event(host, "retraining started", f"{len(batch)} frames")
        self._future = self._executor.submit(self._call_hook, batch)

    def _call_hook(self, batch: List):
        start = time.perf_counter()
        self.stats["labels_requested"] += len(batch)
        new_model = self.hook.on_candidates(batch)
        self.stats["hook_seconds"] += time.perf_counter() - start
        if new_model is not None:
            self.stats["retrainings"] += 1
        return new_model

    def _collect_async(self, host) -> None:
        if self._future is not None and self._future.done():
            self._swap(host, self._wait_future(), "async retraining finished")

    def _wait_future(self):
        future, self._future = self._future, None
        return future.result()

    def _swap(self, host, model, why: str) -> None:
        if model is None:
            return
        host.swap(model)
        self.stats["swaps"] += 1
        self._event(host, "swap", f"{why}: {os.path.basename(getattr(host.potential, 'path', '') or '')}")
        if self.on_swap is not None:
            self.on_swap(host)

    # ---- log ------------------------------------------------------------------------------------
    def _open_log(self):
        if self._log_path is None or self._writer is not None:
            return
        fresh = not os.path.exists(self._log_path) or os.path.getsize(self._log_path) == 0
        self._log_handle = open(self._log_path, "a", newline="")
        self._writer = csv.writer(self._log_handle)
        if fresh:
            self._writer.writerow(["step", "time_ps", "host", "kind", "score_eV_per_A", "energy_sigma_eV",
                                   "labels_requested", "retrainings", "note"])

    def _log(self, host, kind: str, score: float, energy_sigma: float, note: str = "") -> None:
        if self._log_path is None:
            return
        self._open_log()
        self._writer.writerow([host.step, f"{host.time_fs * 1e-3:.6f}", host.name, kind,
                               "nan" if not math.isfinite(score) else f"{score:.6g}",
                               "nan" if not math.isfinite(energy_sigma) else f"{energy_sigma:.6g}",
                               self.stats["labels_requested"], self.stats["retrainings"], note])
        self._log_handle.flush()

    def _event(self, host, kind: str, note: str) -> None:
        self._log(host, kind, math.nan, math.nan, note)


class ActiveLearningReporter:
    """An OpenMM reporter that runs an :class:`ActiveLearner` every ``reportInterval`` steps.

    ``model``/``topology_or_numbers``/``atoms``/``path`` describe the mlmd force in the
    System, as for :func:`mlmd.plugins.openmm.create_force`; swaps replace that force in the
    running Context (positions, velocities and step count kept).
    """

    def __init__(self, learner: ActiveLearner, reportInterval: int, model, topology_or_numbers=None,
                 atoms=None, path: str = "auto", simulation=None):
        if not isinstance(reportInterval, int) or reportInterval < 1:
            raise InputError(f"reportInterval: must be a positive number of steps, got {reportInterval!r}")
        self.learner = learner
        self.interval = reportInterval
        self._args = (model, topology_or_numbers, atoms, path)
        self.host = None
        if simulation is not None:
            self._host(simulation)

    def _host(self, simulation):
        from .hosts import OpenMMHost
        if self.host is None or self.host.simulation is not simulation:
            model, topology_or_numbers, atoms, path = self._args
            self.host = OpenMMHost(simulation, model, topology_or_numbers, atoms, path)
        return self.host

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": None, "include": []}

    def report(self, simulation, state):
        self.learner.check(self._host(simulation))
