"""Observers that write a run's results: CSV log, trajectory, checkpoints.

Each is a callable ``reporter(simulation)`` for :meth:`mlmd.Simulation.attach`, flushes
what it writes at once (a crash loses nothing already reported), and counts what is in
its file so that a restart can cut the file back to the checkpoint.
"""
from __future__ import annotations

import csv
import os
from typing import List

from .io import TrajectoryWriter


def _named(exc: OSError, path: str) -> OSError:
    """The same error with the file it was writing (a full disk's message names the file)."""
    if exc.filename:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), path)


class CSVLog:
    """step, time, energies (eV), temperature (K), [uncertainty (eV/Å)], neighbour-list builds."""

    def __init__(self, path, committee: bool):
        self.path = os.fspath(path)
        self.columns: List[str] = ["step", "time_ps", "potential_eV", "kinetic_eV", "total_eV",
                                   "conserved_eV", "temperature_K"]
        if committee:
            self.columns.append("uncertainty_eV_per_A")
        self.columns.append("neighbor_builds")
        self.rows = 0
        self._handle = None

    def __call__(self, sim) -> None:
        try:
            self._write(sim)
        except OSError as exc:
            raise _named(exc, self.path) from exc

    def _write(self, sim) -> None:
        if self._handle is None:
            fresh = self.rows == 0
            self._handle = open(self.path, "w" if fresh else "a", newline="")
            self._writer = csv.writer(self._handle)
            if fresh:
                self._writer.writerow(self.columns)
        s = sim.state
        kinetic = s.kinetic_energy
        row = [s.step, f"{s.time * 1e-3:.6f}", f"{s.potential_energy:.8f}", f"{kinetic:.8f}",
               f"{s.potential_energy + kinetic:.8f}",
               f"{s.potential_energy + kinetic - s.bath_energy:.8f}", f"{sim.temperature:.4f}"]
        if "uncertainty_eV_per_A" in self.columns:
            row.append(f"{sim.uncertainty:.6g}")
        row.append(sim.neighbor_builds)
        self._writer.writerow(row)
        self._handle.flush()
        self.rows += 1

    def truncate(self, rows: int) -> None:
        """Keep the header and the first ``rows`` rows (for a restart)."""
        self.close()
        with open(self.path, newline="") as handle:
            lines = handle.readlines()[:rows + 1]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as handle:
            handle.writelines(lines)
        os.replace(tmp, self.path)
        self.rows = rows

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class TrajectoryReporter:
    """Writes the current frame through a :class:`~mlmd.md.io.TrajectoryWriter`."""

    def __init__(self, path, atoms, timestep_fs: float, interval: int, fmt=None):
        self.writer = TrajectoryWriter(path, atoms, fmt, timestep_fs=timestep_fs, interval=interval)

    def __call__(self, sim) -> None:
        s = sim.state
        try:
            self.writer.write(s.positions, s.cell, s.step, s.time)
        except OSError as exc:
            raise _named(exc, self.writer.path) from exc

    @property
    def frames(self) -> int:
        return self.writer.frames


class CheckpointReporter:
    """Saves an exact-restart checkpoint, recording how far the other reporters got."""

    def __init__(self, path, log: CSVLog, trajectory: TrajectoryReporter, extra_state=None):
        self.path = os.fspath(path)
        self.log = log
        self.trajectory = trajectory
        self.extra_state = extra_state      # callable -> dict saved too (e.g. the learning loop's)
        #: step, log_rows, trajectory_frames of the last checkpoint on disk (None: none yet)
        self.saved = None

    def __call__(self, sim, force: bool = False) -> None:
        if sim.state.step == 0 and not force:
            return
        extra = {"log_rows": self.log.rows, "trajectory_frames": self.trajectory.frames}
        if self.extra_state is not None:
            extra.update(self.extra_state())
        try:
            sim.save_checkpoint(self.path, extra=extra)
        except OSError as exc:
            raise _named(exc, self.path) from exc
        self.saved = {"step": sim.state.step, "log_rows": extra["log_rows"],
                      "trajectory_frames": extra["trajectory_frames"]}
