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
    """Label one frame; never raises for an oracle failure (returns a Label with ``error``)."""
    from ..models.data import label_frame
    from .oracles import make_oracle

    start = time.perf_counter()
    try:
        calculator = make_oracle(oracle)
        frame = atoms.copy()
        frame.calc = None
        labelled = label_frame(frame, calculator, info={keys.DATA_ORACLE: oracle_name(oracle)})
        results = labelled.calc.results
        if not (math.isfinite(results[keys.DATA_ENERGY]) and np.isfinite(results[keys.DATA_FORCES]).all()):
            raise FloatingPointError("the oracle returned NaN/Inf energy or forces")
    except Exception as exc:   # any oracle failure (tblite raises its own types) skips the frame
        return Label(index, None, f"{type(exc).__name__}: {exc}".strip(), time.perf_counter() - start)
    return Label(index, labelled, "", time.perf_counter() - start)


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
    from distributed import as_completed

    futures = [client.submit(label_one, atoms, oracle, index, pure=False) for index, atoms in enumerate(frames)]
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(futures)
    try:
        for future in as_completed(futures, timeout=timeout):
            pending.discard(future)
            try:
                label = future.result()
            except Exception as exc:   # a worker died or the task could not run
                index = futures.index(future)
                label = Label(index, None, f"{type(exc).__name__}: {exc}")
            results[label.index] = label
            if label.ok and on_label is not None:
                on_label(label)
            if deadline is not None and time.monotonic() > deadline:
                break
    except Exception as exc:   # distributed's TimeoutError on the whole batch
        if "timeout" not in type(exc).__name__.lower() and "Timeout" not in str(exc):
            raise
    for future in pending:
        index = futures.index(future)
        if not results[index].ok:
            results[index] = Label(index, None, f"TimeoutError: no label within {timeout} s", timeout or 0.0)
        future.cancel()


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
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=int(threads_per_worker),
                               processes=True, dashboard_address=None,
                               env={"OMP_NUM_THREADS": str(threads_per_worker)})
        return Client(cluster)
    if not isinstance(address, str) or "://" not in address:
        raise InputError(f"dask: expected 'local', a scheduler address like 'tcp://host:8786', or none; "
                         f"got {address!r}")
    return Client(address)
