"""When is the model out of its depth: trust levels, label budgets, de-duplication, rollback.

DP-GEN's semantics on the calibrated frame score s (eV/Å, :func:`frame_scores`):

    s < sigma_lo            trusted     MD goes on, the state may be kept for a rollback
    sigma_lo <= s < sigma_hi  candidate  worth a reference label
    s >= sigma_hi or NaN    lost        the trajectory is no longer physical: roll back

A :class:`Trigger` turns a stream of (step, time, score, frame) into candidate frames,
within a budget of labels per ns of simulated time and without near-duplicates.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, List, Optional

import numpy as np

from ..errors import InputError

TRUSTED, CANDIDATE, LOST = "trusted", "candidate", "lost"


@dataclass(frozen=True)
class TrustLevels:
    sigma_lo: float      # eV/Å
    sigma_hi: float      # eV/Å

    def __post_init__(self):
        for name in ("sigma_lo", "sigma_hi"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"{name}: must be a positive force σ in eV/Å, got {value!r}")
        if not self.sigma_lo < self.sigma_hi:
            raise InputError(f"sigma_hi: must be larger than sigma_lo ({self.sigma_lo}), got {self.sigma_hi}")

    def classify(self, score: float) -> str:
        if score is None or not math.isfinite(score) or score >= self.sigma_hi:
            return LOST
        return TRUSTED if score < self.sigma_lo else CANDIDATE


def frame_distance(a, b) -> float:
    """RMS displacement (Å) between two frames of the same system, after removing the mean
    displacement; minimum-image displacements along periodic directions, and for an open
    system after the best rotation (Kabsch), so a rigidly moved copy is at distance 0."""
    pa, pb = np.asarray(a.positions, dtype=np.float64), np.asarray(b.positions, dtype=np.float64)
    if pa.shape != pb.shape:
        return math.inf
    delta = pb - pa
    pbc = np.asarray(a.pbc, dtype=bool)
    if pbc.any():
        from ase.geometry import find_mic
        delta, _ = find_mic(delta, a.cell, pbc)
        delta = delta - delta.mean(axis=0)
        return float(np.sqrt((delta ** 2).sum(axis=1).mean()))
    ca, cb = pa - pa.mean(axis=0), pb - pb.mean(axis=0)
    u, _, vt = np.linalg.svd(cb.T @ ca)
    d = np.sign(np.linalg.det(u @ vt))
    rotation = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.sqrt(((cb @ rotation - ca) ** 2).sum(axis=1).mean()))


SELECTIONS = ("sigma", "diverse")


def _sigma(frame) -> float:
    return float(frame.info.get("active_sigma", 0.0))


def farthest_points(frames: List[Any], count: int, taken: List[Any] = ()) -> List[int]:
    """Indices of ``count`` of ``frames`` chosen by greedy farthest-point sampling on
    :func:`frame_distance`: the first is the most uncertain (``info["active_sigma"]``), each next
    one the farthest from those chosen and from the frames ``taken`` before (ties: the higher σ)."""
    if count >= len(frames):
        return list(range(len(frames)))
    sigma = np.array([_sigma(frame) for frame in frames])

    def distances(anchor) -> np.ndarray:
        return np.array([frame_distance(anchor, frame) for frame in frames])

    nearest = np.full(len(frames), np.inf)
    for other in taken:
        nearest = np.minimum(nearest, distances(other))
    chosen = [int(np.argmax(sigma))]
    nearest = np.minimum(nearest, distances(frames[chosen[0]]))
    while len(chosen) < count:
        score = nearest.copy()
        score[chosen] = -np.inf
        best = np.flatnonzero(score == score.max())
        chosen.append(int(best[np.argmax(sigma[best])]))
        nearest = np.minimum(nearest, distances(frames[chosen[-1]]))
    return chosen


@dataclass
class Trigger:
    """Collects candidate frames for labelling.

    levels          :class:`TrustLevels`
    labels_per_ns   budget: at most this many candidates per ns of simulated time, plus
                    ``burst`` at any time (the first batch needs no waiting); 0: no limit
    dedup_rmsd      Å: a candidate closer than this (:func:`frame_distance`) to one already
                    taken is dropped
    batch_size      candidates handed to the hook per batch
    pool            a batch is ready when ``batch_size × pool`` candidates are pending; ``batch_size``
                    of them go to the hook and the others are dropped (1: every accepted candidate
                    is labelled)
    select          how they are chosen from the pool: "sigma", the highest σ
                    (``frame.info["active_sigma"]``); "diverse", farthest-point sampling by
                    :func:`frame_distance`, from the most uncertain one, away from each other and
                    from the frames already taken, so one excursion does not fill a whole batch
    """

    levels: TrustLevels
    labels_per_ns: float = 0.0
    burst: int = 8
    dedup_rmsd: float = 0.05
    batch_size: int = 4
    pool: int = 1
    select: str = "sigma"
    taken: int = 0                                     # candidates handed to the hook (the budget's count)
    pending: List[Any] = field(default_factory=list)   # accepted, not yet handed to the hook
    recent: Deque[Any] = field(default_factory=lambda: deque(maxlen=64))
    counts: dict = field(default_factory=lambda: {TRUSTED: 0, CANDIDATE: 0, LOST: 0, "duplicate": 0,
                                                  "over_budget": 0, "not_selected": 0})

    def __post_init__(self):
        if self.labels_per_ns < 0:
            raise InputError(f"labels_per_ns: must be >= 0 (0: no limit), got {self.labels_per_ns}")
        if self.batch_size < 1:
            raise InputError(f"batch_size: must be >= 1, got {self.batch_size}")
        if not isinstance(self.pool, int) or self.pool < 1:
            raise InputError(f"pool: must be a whole number >= 1, got {self.pool!r}")
        if self.select not in SELECTIONS:
            raise InputError(f"select: expected one of {SELECTIONS}, got {self.select!r}")
        if self.dedup_rmsd < 0:
            raise InputError(f"dedup_rmsd: must be >= 0 Å, got {self.dedup_rmsd}")

    def allowance(self, time_fs: float) -> float:
        if self.labels_per_ns <= 0:
            return math.inf
        return self.burst + self.labels_per_ns * time_fs * 1e-6

    def observe(self, score: float, frame=None, time_fs: float = 0.0) -> str:
        """Classify a frame; a candidate's ``frame`` (ase.Atoms) is kept if budget and
        de-duplication allow.  Returns the class."""
        kind = self.levels.classify(score)
        self.counts[kind] += 1
        if kind == CANDIDATE and frame is not None:
            self.offer(frame, time_fs)
        return kind

    def offer(self, frame, time_fs: float) -> bool:
        if self.taken + len(self.pending) / self.pool >= self.allowance(time_fs):
            self.counts["over_budget"] += 1
            return False
        if self.dedup_rmsd > 0 and any(frame_distance(frame, other) < self.dedup_rmsd
                                       for other in list(self.recent) + self.pending):
            self.counts["duplicate"] += 1
            return False
        self.pending.append(frame)
        return True

    @property
    def ready(self) -> bool:
        return len(self.pending) >= self.batch_size * self.pool

    def take(self) -> List[Any]:
        """Hand the pending candidates over (to the hook), the ``batch_size`` most uncertain when
        ``pool`` > 1; they stay known for de-duplication."""
        batch, self.pending = self.pending, []
        if self.pool > 1 and len(batch) > self.batch_size:
            if self.select == "diverse":
                chosen = farthest_points(batch, self.batch_size, list(self.recent))
            else:
                chosen = np.argsort([-_sigma(frame) for frame in batch], kind="stable")[:self.batch_size]
            self.counts["not_selected"] += len(batch) - self.batch_size
            batch = [batch[i] for i in sorted(chosen)]
        self.taken += len(batch)
        self.recent.extend(batch)
        return batch

    def give_back(self, batch: List[Any]) -> None:
        """Return a batch the hook could not take yet (it is busy) to the front of the queue."""
        self.pending[:0] = batch
        self.taken -= len(batch)

    def state_dict(self) -> dict:
        return {"taken": self.taken, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.taken = int(state.get("taken", 0))
        self.counts.update(state.get("counts", {}))


class RingBuffer:
    """The last ``capacity`` trusted states (whatever the host's ``snapshot()`` returns:
    positions, velocities, cell, thermostat RNG state, step), for a rollback when lost."""

    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise InputError(f"capacity: the rollback buffer needs at least 1 slot, got {capacity}")
        self._items: Deque[Any] = deque(maxlen=capacity)

    def push(self, snapshot) -> None:
        self._items.append(snapshot)

    def last(self) -> Optional[Any]:
        return self._items[-1] if self._items else None

    def __len__(self) -> int:
        return len(self._items)
