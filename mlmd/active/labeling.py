"""Labelling candidate frames with an oracle, in process or fanned out through Dask.

A failed label (the calculator raises, its SCF does not converge, it returns NaN, or it
takes longer than ``timeout``) skips that frame: it is reported and logged, never raised,
so MD goes on and the data set only ever receives complete labels.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from .. import keys
from ..errors import InputError
from .oracles import oracle_name

log = logging.getLogger("mlmd.active")


@dataclass
class Label:
    index: int                 # position of the frame in the batch
    frame: object = None       # labelled ase.Atoms (SinglePointCalculator), None on failure
    error: str = ""            # why it failed
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.frame is not None


def label_one(atoms, oracle: Union[str, object], index: int = 0) -> Label:
    """Label one frame; never raises for an oracle failure (returns a Label with ``error``).

    The calculation runs on a calculator no other thread uses (:func:`~mlmd.active.oracles.checked_out`),
    and the label is checked before it is returned: energy a finite number, forces [N,3] finite,
    the labelled frame and the calculator's last geometry equal to ``atoms``.
    """
    from ..models.data import label_frame
    from .oracles import checked_out

    start = time.perf_counter()
    try:
        with checked_out(oracle) as calculator:
            frame = atoms.copy()
            frame.calc = None
            labelled = label_frame(frame, calculator, info={keys.DATA_ORACLE: oracle_name(oracle)})
            computed_on = getattr(calculator, "atoms", None)
            computed_on = None if computed_on is None else (computed_on.numbers.copy(), computed_on.positions.copy())
        check_label(atoms, labelled, computed_on)
    except Exception as exc:   # any oracle failure (tblite raises its own types) skips the frame
        return Label(index, None, f"{type(exc).__name__}: {exc}".strip(), time.perf_counter() - start)
    return Label(index, labelled, "", time.perf_counter() - start)


class BadLabel(ValueError):
    """A label that does not belong to its frame or is not a number."""


def check_label(atoms, labelled, computed_on=None) -> None:
    """Raise BadLabel unless ``labelled`` is a complete, finite label of ``atoms``.

    computed_on  (numbers, positions) the calculator last computed, when it says (ASE's calc.atoms)
    """
    results = labelled.calc.results
    energy = results.get(keys.DATA_ENERGY)
    forces = np.asarray(results.get(keys.DATA_FORCES, np.zeros((0, 3))))
    n_atoms = len(atoms)
    if not isinstance(energy, (float, int, np.floating)) or not math.isfinite(energy):
        raise BadLabel(f"the oracle's energy is not a finite number ({energy!r})")
    if forces.shape != (n_atoms, 3):
        raise BadLabel(f"the oracle's forces have shape {list(forces.shape)}, the frame has {n_atoms} atoms")
    if not np.isfinite(forces).all():
        bad = np.unique(np.nonzero(~np.isfinite(forces))[0])
        raise BadLabel(f"the oracle returned NaN/Inf forces on atom(s) {bad[:10].tolist()}")
    if not (np.array_equal(labelled.numbers, atoms.numbers) and np.array_equal(labelled.positions, atoms.positions)):
        raise BadLabel("the labelled frame is not the frame asked for")
    if computed_on is not None and not (np.array_equal(computed_on[0], atoms.numbers)
                                        and np.array_equal(computed_on[1], atoms.positions)):
        raise BadLabel("the oracle's results belong to another geometry (a calculator shared between threads?)")


def label_frames(frames: Sequence, oracle: Union[str, object], client=None, timeout: Optional[float] = None,
                 on_label: Optional[Callable[[Label], None]] = None, failure_log: Optional[str] = None) -> List[Label]:
    """Labels for ``frames`` (ase.Atoms), in batch order.

    client      a ``distributed.Client``: one task per frame on its workers; None: in process
    timeout     seconds per batch (Dask) or per frame (in process); a frame not done is skipped
    on_label    called with each successful Label as soon as it is ready (the data set is
                appended there, so a kill loses no finished label)
    failure_log a JSON-lines file that receives one record per failed frame
    """
    if timeout is not None and not timeout > 0:
        raise InputError(f"timeout: must be a positive number of seconds or None, got {timeout!r}")
    frames = list(frames)
    results: List[Label] = [Label(i, None, "not labelled") for i in range(len(frames))]
    if client is not None:
        _label_with_dask(frames, oracle, client, timeout, results, on_label)
    else:
        for index, atoms in enumerate(frames):
            label = _label_in_process(atoms, oracle, index, timeout)
            results[index] = label
            if label.ok and on_label is not None:
                on_label(label)
    for label in results:
        if not label.ok:
            log.warning("oracle %s: frame %d skipped (%s)", oracle_name(oracle), label.index, label.error)
            if failure_log:
                _append_json(failure_log, {"time": time.time(), "oracle": oracle_name(oracle),
                                           "frame": label.index, "error": label.error,
                                           **{k: v for k, v in frames[label.index].info.items()
                                              if isinstance(v, (int, float, str))}})
    return results


def _label_in_process(atoms, oracle, index: int, timeout: Optional[float]) -> Label:
    if timeout is None:
        return label_one(atoms, oracle, index)
    import concurrent.futures

    # a thread, not a signal: works off the main thread too; a hung oracle keeps its thread
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(label_one, atoms, oracle, index)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return Label(index, None, f"TimeoutError: no label within {timeout} s", timeout)
    finally:
        pool.shutdown(wait=False)


def _label_with_dask(frames, oracle, client, timeout, results: List[Label], on_label) -> None:
    futures = [client.submit(label_one, atoms, oracle, index, pure=False) for index, atoms in enumerate(frames)]
    index_of = {future.key: index for index, future in enumerate(futures)}
    late = "not labelled"
    try:
        for future in completed(client, futures, timeout=timeout):
            try:
                label = future.result()
            except Exception as exc:   # a worker died or the task could not run
                label = Label(index_of[future.key], None, f"{type(exc).__name__}: {exc}")
            results[label.index] = label
            if label.ok and on_label is not None:
                on_label(label)
    except DaskWaitTimeout as exc:
        late = f"TimeoutError: {exc}"
    finally:
        for future in futures:         # Ctrl-C, a timeout: nothing left running for this batch
            if not future.done():
                future.cancel()
    for index, label in enumerate(results):
        if not label.ok and label.error == "not labelled":
            results[index] = Label(index, None, late, timeout or 0.0)


#: seconds a Dask wait goes on while the cluster has no worker at all
WORKER_TIMEOUT = 120.0


class DaskWaitTimeout(TimeoutError):
    """A Dask wait ran past its timeout, or the cluster had no worker for WORKER_TIMEOUT seconds."""


def completed(client, futures, timeout: Optional[float] = None, worker_timeout: Optional[float] = None):
    """Yield ``futures`` as they finish; every wait is bounded.

    Waits in slices of at most 1 s (Ctrl-C is seen within a second) and raises
    :class:`DaskWaitTimeout` when ``timeout`` seconds have passed, or when the cluster has had no
    worker for ``worker_timeout`` seconds (default :data:`WORKER_TIMEOUT`): a cluster of zero
    workers, or one whose workers died, never finishes anything.
    """
    from distributed import wait

    worker_timeout = WORKER_TIMEOUT if worker_timeout is None else float(worker_timeout)
    start = time.monotonic()
    deadline = None if timeout is None else start + float(timeout)
    no_workers_since = None
    pending = list(futures)
    while pending:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DaskWaitTimeout(f"no result within {timeout} s")
        if not client.scheduler_info().get("workers"):
            no_workers_since = now if no_workers_since is None else no_workers_since
            if now - no_workers_since >= worker_timeout:
                raise DaskWaitTimeout(f"the Dask cluster ({client.scheduler.address}) has had no worker for "
                                      f"{worker_timeout:.0f} s; start workers, or use dask: local with workers >= 1")
        else:
            no_workers_since = None
        slice_s = 1.0 if deadline is None else max(min(1.0, deadline - now), 0.01)
        try:
            done, _ = wait(pending, timeout=slice_s, return_when="FIRST_COMPLETED")
        except TimeoutError:
            continue
        for future in [f for f in pending if f in done]:
            pending.remove(future)
            yield future


def _append_json(path: str, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def make_client(address: Optional[str] = "local", workers: int = 2, threads_per_worker: int = 1):
    """A ``distributed.Client``: "local" starts a LocalCluster of ``workers`` processes (one
    torch thread each), an address ("tcp://host:8786") joins a running scheduler, None: no Dask."""
    if address in (None, "", "none", False):
        return None
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        from ..errors import missing_dependency
        raise missing_dependency("distributed", "dask", "fanning labelling and training out") from None
    if address == "local":
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"workers: a local Dask cluster needs a whole number of workers >= 1 (with none it "
                             f"never labels anything), got {workers!r}")
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=int(threads_per_worker),
                               processes=True, dashboard_address=None,
                               env={"OMP_NUM_THREADS": str(threads_per_worker)})
        return Client(cluster)
    if not isinstance(address, str) or "://" not in address:
        raise InputError(f"dask: expected 'local', a scheduler address like 'tcp://host:8786', or none; "
                         f"got {address!r}")
    return Client(address)
