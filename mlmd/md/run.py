"""``mlmd run CONFIG``: production MD in the internal engine from a YAML file.

A config (or a ``systems/<name>`` folder holding ``run.yaml``)::

    structure: ethanol.xyz            # relative to the config file; anything ASE/mdtraj reads
    model: ethanol_committee.pt       # relative to the config file
    integrator: langevin              # verlet (NVE) | langevin (BAOAB) | bussi
    timestep: 0.5                     # fs
    temperature: 300                  # K
    steps: 20000
    output: runs/ethanol              # relative to the working directory

writes into ``output``: ``log.csv``, the trajectory (``trajectory.dcd`` by default, which needs
OpenMM, else ``trajectory.extxyz``; .xtc or .extxyz by its suffix) with ``topology.pdb`` (bonds
as CONECT records) next to it, ``checkpoint.npz`` (every
``checkpoint_interval`` steps and at exit), ``summary.png`` and ``config.yaml`` (the
resolved config).  ``--restart`` continues from the checkpoint, exactly.
"""
from __future__ import annotations

import errno
import math
import os
import socket
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import InputError, MLMDError

CONFIG_NAME = "run.yaml"


@dataclass
class RunConfig:
    structure: str
    model: str
    steps: int
    integrator: str = "langevin"
    timestep: float = 0.5               # fs
    temperature: Optional[float] = None  # K
    friction: float = 1.0               # 1/ps (Langevin)
    tau: float = 100.0                  # fs (Bussi)
    seed: int = 0
    skin: float = 1.0                   # Å
    min_distance: Optional[float] = None  # Å: closer atoms stop the run (None: half the covalent radii sum; 0: off)
    fixed: List[int] = field(default_factory=list)
    remove_com: bool = True
    dtype: Optional[str] = None         # float32 | float64 (default: the model file's)
    device: str = "cpu"
    compiled: bool = False              # run the compiled form of the model (mlmd.compiled; compiles at start)
    member: Optional[int] = None        # drive the MD with this committee member alone (None: the committee mean)
    threads: Optional[int] = None      # torch CPU threads (None: one per 256 atoms, mlmd.threads)
    output: str = "runs/md"
    trajectory: Optional[str] = None    # trajectory.dcd with OpenMM installed, else .extxyz
    trajectory_interval: int = 100
    log_interval: int = 10
    checkpoint_interval: int = 1000
    plot: bool = True
    # MD observables with credible intervals from the committee (mlmd.observables), computed on the
    # trajectory's frames after the run: e.g. [{kind: rdf, elements: [O, H]}, {kind: energy}]
    observables: List[Dict[str, Any]] = field(default_factory=list)
    observables_level: float = 0.9      # probability of the credible intervals
    observables_discard: float = 0.2    # fraction of the trajectory's first frames left out (equilibration)
    allow_outside_output: bool = False  # let `trajectory` name a file outside the output folder

    CONFIG_NAME = CONFIG_NAME                  # the file looked for in a folder
    PATH_KEYS = ("structure", "model")         # resolved relative to the config file

    @classmethod
    def from_file(cls, path: str, overrides: Optional[Dict[str, Any]] = None) -> "RunConfig":
        import yaml

        path = os.fspath(path)
        if os.path.isdir(path):
            folder = path
            path = os.path.join(path, cls.CONFIG_NAME)
            if not os.path.isfile(path):
                raise InputError(f"config: folder {folder!r} has no {cls.CONFIG_NAME}; give a YAML file")
        if not os.path.isfile(path):
            raise InputError(f"config: file {path!r} does not exist")
        with open(path) as handle:
            try:
                raw = yaml.safe_load(handle)
            except yaml.YAMLError as exc:
                raise InputError(f"config: {path!r} is not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise InputError(f"config: {path!r} must be a mapping of keys to values")
        raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
        base = os.path.dirname(os.path.abspath(path))
        for key in cls.PATH_KEYS:
            if isinstance(raw.get(key), str) and not os.path.isabs(raw[key]):
                raw[key] = os.path.join(base, raw[key])
        cls.resolve_nested_paths(raw, base)
        if "output" not in raw:
            raw["output"] = os.path.join("runs", os.path.basename(base) if path.endswith(cls.CONFIG_NAME)
                                         else os.path.splitext(os.path.basename(path))[0])
        return cls.from_dict(raw, source=path)

    @classmethod
    def resolve_nested_paths(cls, raw: Dict[str, Any], base: str) -> None:
        """Make paths inside nested keys relative to the config file (``base``), in place."""

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str = "config") -> "RunConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InputError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        missing = [name for name, f in known.items()
                   if f.default is MISSING and f.default_factory is MISSING and name not in raw]
        if missing:
            raise InputError(f"{source}: missing required key(s) {missing}")
        config = cls(**raw)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        def bad(key, why):
            raise InputError(f"{source}: {key}: {why}, got {getattr(self, key)!r}")

        from ..validate import check_field_types
        check_field_types(self, source)     # every key by type first: "false" is not false
        if not self.output:
            bad("output", "must name a folder")
        for key in ("structure", "model"):
            if not isinstance(getattr(self, key), str):
                bad(key, "must be a file path")
            if not os.path.isfile(getattr(self, key)):
                bad(key, "file does not exist")
        from .integrators import INTEGRATORS   # numba: not needed for `mlmd run --help`
        if self.integrator not in INTEGRATORS:
            bad("integrator", f"must be one of {sorted(INTEGRATORS)}")
        for key in ("timestep", "friction", "tau"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                bad(key, "must be a positive number")
        if self.integrator != "verlet" and self.temperature is None:
            bad("temperature", f"the {self.integrator} thermostat needs a temperature in K")
        if self.temperature is not None and (isinstance(self.temperature, bool)
                                             or not isinstance(self.temperature, (int, float))
                                             or not self.temperature > 0):
            bad("temperature", "must be a positive number of K")
        for key in ("steps", "trajectory_interval", "log_interval", "checkpoint_interval"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "steps" else 1):
                bad(key, "must be a whole number" + (" >= 0" if key == "steps" else " >= 1"))
        if isinstance(self.skin, bool) or not isinstance(self.skin, (int, float)) or self.skin < 0:
            bad("skin", "must be a length >= 0 (Å)")
        if self.min_distance is not None and (not math.isfinite(self.min_distance) or self.min_distance < 0):
            bad("min_distance", "must be a length >= 0 (Å; 0: no overlap check), or left out")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            bad("seed", "must be an integer")
        if not isinstance(self.fixed, list) or not all(isinstance(i, int) for i in self.fixed):
            bad("fixed", "must be a list of atom indices")
        if self.dtype not in (None, "float32", "float64"):
            bad("dtype", "must be float32 or float64")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            bad("threads", "must be a whole number >= 1 (or left out for the default)")
        from .io import TRAJECTORY_FORMATS, check_trajectory_format
        if self.trajectory is None:
            # DCD where OpenMM is installed (what VMD/mdtraj users expect), else ASE's extxyz
            try:
                check_trajectory_format("dcd")
                self.trajectory = "trajectory.dcd"
            except ImportError as missing:
                print(f"mlmd run: writing trajectory.extxyz ({missing})")
                self.trajectory = "trajectory.extxyz"
        if not isinstance(self.trajectory, str):
            bad("trajectory", "must be a file name")
        suffix = os.path.splitext(self.trajectory)[1].lstrip(".").lower()
        if suffix not in TRAJECTORY_FORMATS + ("xyz",):
            bad("trajectory", f"must end in one of {['.' + f for f in TRAJECTORY_FORMATS]}")
        # before anything is written: a missing package must not leave a half-made run folder
        check_trajectory_format("extxyz" if suffix == "xyz" else suffix)
        self.trajectory_path()
        if self.member is not None and self.member < 0:
            bad("member", "must be a committee member index from 0 (or left out for the committee mean)")
        if self.observables and self.member is not None:
            bad("observables", "reweighting assumes the committee mean drove the run; leave member out, or "
                               "compute each member run's distributions with mlmd.observables")
        if self.observables:
            from ..observables import parse_observables
            from .io import read_structure

            if self.temperature is None or self.integrator == "verlet":
                bad("observables", "reweighting to each committee member needs a canonical run: give a "
                                   "thermostat (integrator: langevin or bussi) and a temperature")
            if not 0 < self.observables_level < 1:
                bad("observables_level", "must be a probability between 0 and 1, e.g. 0.9")
            if not 0 <= self.observables_discard < 1:
                bad("observables_discard", "must be a fraction in [0, 1), e.g. 0.2")
            parse_observables(self.observables, read_structure(self.structure))

    def trajectory_path(self) -> str:
        """Where the trajectory goes: inside ``output`` unless ``allow_outside_output``."""
        path = os.path.normpath(os.path.join(self.output, self.trajectory))
        inside = os.path.commonpath([os.path.abspath(self.output), os.path.abspath(path)]) \
            == os.path.abspath(self.output)
        if not inside and not self.allow_outside_output:
            raise InputError(f"trajectory: {self.trajectory!r} leaves the output folder {self.output!r}; "
                             "give a file name inside it, or set allow_outside_output: true to write there "
                             "(an existing file is never overwritten)")
        return path

    def output_paths(self) -> List[str]:
        """Every file and folder a fresh run creates (a fresh run refuses to start over any of them)."""
        names = ("log.csv", "checkpoint.npz", "config.yaml", "summary.png", "topology.pdb", "observables.csv",
                 "observables.png")
        return [os.path.join(self.output, name) for name in names] + [self.trajectory_path()]


def run(config: RunConfig, restart: bool = False, progress: bool = True, extension=None,
        allow_model_change: bool = False) -> Dict[str, Any]:
    """Run (or continue) the MD described by ``config``; returns a summary dict.

    The output folder is locked for the run (a second ``mlmd run`` on it is refused), a fresh
    run refuses to start over any file a run writes, ``restart`` refuses a checkpoint written
    with another model file unless ``allow_model_change``, and a full disk stops the run with
    a message that says which files are intact (an :class:`~mlmd.errors.MLMDError`).

    ``extension`` (the learning loop of ``mlmd learn``) plugs into the run: ``state()`` goes
    into every checkpoint, ``start(sim, extra, checkpoint)`` is called once the state is
    restored (``extra``: the checkpoint's, None for a fresh run; ``checkpoint()`` saves one
    now) and returns [(observer, interval)], ``finish(sim, aborted)`` at exit (``aborted``:
    Ctrl-C or a failure), ``summary()`` is merged into the result; ``models_checked`` True means
    the extension checks the model against the checkpoint itself.
    """
    out = config.output
    checkpoint = os.path.join(out, "checkpoint.npz")
    config.trajectory_path()
    if restart and not os.path.isfile(checkpoint):
        raise InputError(f"restart: {checkpoint!r} does not exist; run without --restart first")
    os.makedirs(out, exist_ok=True)
    lock = OutputLock(out)
    progress_note: Dict[str, Any] = {}
    try:
        if not restart:
            _refuse_to_clobber(config)
        return _run_locked(config, restart, progress, extension, allow_model_change, progress_note)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(_disk_full_message(config, exc, progress_note)) from None
    finally:
        lock.release()


class DiskFullError(MLMDError, OSError):
    """The disk filled up during a run: what is intact and how to go on is in the message."""


class OutputLock:
    """An exclusive ``flock`` on ``FOLDER/.mlmd.lock`` for as long as a run writes there; the
    operating system drops it when the process ends, kill -9 included."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".mlmd.lock")
        self._handle = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:          # not POSIX: no lock, as before
            return
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "another process"
            self._handle.close()
            self._handle = None
            raise InputError(f"output: {folder!r} is in use by another mlmd run ({holder}); wait for it to "
                             "finish, or choose another output folder (--out)") from None
        try:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            self._handle.flush()
        except OSError:              # a full disk: the lock holds without the note
            pass

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()     # closing the descriptor drops the flock
            self._handle = None


def _refuse_to_clobber(config: RunConfig) -> None:
    existing = [path for path in config.output_paths() if os.path.exists(path)]
    if existing:
        names = [os.path.relpath(path, config.output) for path in existing]
        raise InputError(f"output: {config.output!r} already holds {', '.join(names)} of another run; "
                         "pass --restart to continue that run, or choose another output folder (--out); "
                         "nothing was written")


def _disk_full_message(config: RunConfig, exc: OSError, note: Dict[str, Any]) -> str:
    where = f" while writing {exc.filename}" if exc.filename else ""
    step = note.get("step")
    lines = [f"the disk is full ({exc.strerror or exc}){where}"
             + (f" at step {step}" if step is not None else "") + "."]
    saved = note.get("checkpoint")
    traj = os.path.relpath(config.trajectory_path(), config.output)
    if saved:
        lines.append(f"Intact: checkpoint.npz of step {saved['step']} and what it covers, the first "
                     f"{saved['log_rows']} rows of log.csv and {saved['trajectory_frames']} frames of {traj}"
                     + (" (and every label in active/)" if note.get("learning") else "")
                     + f"; what was written after step {saved['step']} is cut away by the restart.")
        lines.append(f"Free space on the disk holding {config.output!r}, then continue with "
                     "`mlmd run CONFIG --restart` (`mlmd learn CONFIG --restart` for a learning run).")
    else:
        lines.append(f"No checkpoint was written yet, so there is nothing to continue: free space, remove "
                     f"{config.output!r} and start the run again.")
    return " ".join(lines)


def _run_locked(config: RunConfig, restart: bool, progress: bool, extension, allow_model_change: bool,
                note: Dict[str, Any]) -> Dict[str, Any]:
    import yaml

    from .reporters import CheckpointReporter, CSVLog, TrajectoryReporter
    from .simulation import Simulation

    out = config.output
    checkpoint = os.path.join(out, "checkpoint.npz")
    note["learning"] = extension is not None
    if config.compiled:
        print("mlmd run: compiling the model (once per process: ~1-2 min on a 2-core CPU the first time on a "
              "machine, ~30 s from TorchInductor's cache)", flush=True)
    sim = Simulation(config.structure, config.model, integrator=config.integrator, timestep=config.timestep,
                     temperature=config.temperature, friction=config.friction, tau=config.tau,
                     seed=config.seed, skin=config.skin, fixed=config.fixed or None,
                     remove_com=config.remove_com, dtype=config.dtype, device=config.device,
                     threads=config.threads, min_distance=config.min_distance, compiled=config.compiled,
                     member=config.member)
    log = CSVLog(os.path.join(out, "log.csv"), committee=sim.potential.committee_size > 1)
    trajectory = TrajectoryReporter(config.trajectory_path(), sim.atoms, config.timestep,
                                    config.trajectory_interval)
    checkpointer = CheckpointReporter(checkpoint, log, trajectory,
                                      extra_state=extension.state if extension is not None else None)
    extra = None
    if restart:
        models_checked = extension is not None and getattr(extension, "models_checked", False)
        extra = sim.load_checkpoint(checkpoint, allow_model_change=allow_model_change or models_checked)
        log.truncate(int(extra.get("log_rows", 0)))
        trajectory.writer.truncate(int(extra.get("trajectory_frames", 0)))
        checkpointer.saved = {"step": sim.state.step, "log_rows": log.rows, "trajectory_frames": trajectory.frames}
    else:
        with open(os.path.join(out, "config.yaml"), "w") as handle:
            yaml.safe_dump(asdict(config), handle, sort_keys=False)
        if trajectory.writer.format != "extxyz":
            from .io import write_topology_pdb
            write_topology_pdb(os.path.join(out, "topology.pdb"), sim.atoms)
    note["checkpoint_reporter"] = checkpointer
    sim.attach(log, config.log_interval)
    sim.attach(trajectory, config.trajectory_interval)
    sim.attach(checkpointer, config.checkpoint_interval)
    if extension is not None:
        for observer, interval in extension.start(sim, extra, lambda: checkpointer(sim, force=True)):
            sim.attach(observer, interval)
    remaining = max(config.steps - sim.state.step, 0)
    interrupted = False
    failure: Optional[BaseException] = None
    try:
        sim.run(remaining, progress=progress)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException as exc:
        failure = exc
        raise
    finally:
        note["step"] = sim.state.step
        note["checkpoint"] = checkpointer.saved
        # after a failure (a full disk, a broken state) closing may fail again: the first error counts
        cleanup = [lambda: extension.finish(sim, aborted=interrupted or failure is not None)] \
            if extension is not None else []
        for close in cleanup + [log.close, trajectory.writer.close]:
            try:
                close()
            except Exception:
                if failure is None:
                    raise
    if sim.steps_run and sim.state.step % config.log_interval:
        log(sim)            # the exit state is always in the log
        log.close()
    checkpointer(sim)       # and in the checkpoint
    note["checkpoint"] = checkpointer.saved
    summary = summarize(os.path.join(out, "log.csv"), sim)
    summary["interrupted"] = interrupted
    if extension is not None:
        summary.update(extension.summary())
    if config.plot:
        summary["plot"] = plot_log(os.path.join(out, "log.csv"), os.path.join(out, "summary.png"),
                                   title=f"{os.path.basename(config.structure)} — {config.integrator}, "
                                         f"{config.timestep} fs",
                                   target_temperature=config.temperature)
    if config.observables and not interrupted:
        summary.update(run_observables(config, sim, progress))
    return summary


def run_observables(config: RunConfig, sim, progress: bool) -> Dict[str, Any]:
    """The run's observables with committee intervals: observables.csv and observables.png."""
    import warnings

    from .. import observables

    frames = observables.read_frames(config.trajectory_path(), os.path.join(config.output, "topology.pdb"))
    frames = frames[int(config.observables_discard * len(frames)):]
    if len(frames) < 2:
        return {"observables": f"skipped: the trajectory holds {len(frames)} frame(s); lower trajectory_interval"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        report = observables.evaluate(frames, sim.potential, config.observables, config.temperature,
                                      level=config.observables_level, progress=progress)
    for warning in caught:
        print(f"mlmd run: observables: {warning.message}", flush=True)
    result = {"observables_csv": observables.write_csv(report, os.path.join(config.output, "observables.csv")),
              "observables_frames": report.n_frames,
              "observables_min_ess_percent": float(100 * report.ess_fraction.min()),
              "observables_reliable": report.reliable}
    if config.plot:
        result["observables_plot"] = observables.plot(report, os.path.join(config.output, "observables.png"))
    return result


def read_log(path: str) -> Dict[str, np.ndarray]:
    data = np.genfromtxt(path, delimiter=",", names=True)
    data = np.atleast_1d(data)
    return {name: np.asarray(data[name], dtype=float) for name in data.dtype.names}


def summarize(log_path: str, sim) -> Dict[str, Any]:
    log = read_log(log_path)
    n_atoms = len(sim.state.positions)
    t = log["time_ps"]
    conserved = log["conserved_eV"]
    summary: Dict[str, Any] = {
        "steps": int(sim.state.step), "time_ps": float(sim.state.time * 1e-3), "atoms": n_atoms,
        "mean_temperature_K": float(np.mean(log["temperature_K"][1:])) if len(t) > 1 else float("nan"),
        "conserved_fluctuation_eV": float(np.std(conserved)),
        "neighbor_builds": int(sim.neighbor_builds),
        "wall_s": sim.wall_time,
        "model_form": "compiled" if sim.potential.is_compiled else "TorchScript",
    }
    report = getattr(sim.potential.module, "compile_report", None)
    if report:
        summary["compile_s"] = float(report["compile_seconds"])
    if len(t) > 2 and t[-1] > t[0]:
        slope = np.polyfit(t, conserved, 1)[0]
        summary["drift_eV_per_atom_per_ps"] = float(slope / n_atoms)
    if sim.wall_time > 0 and sim.steps_run:
        summary["ns_per_day"] = sim.steps_run * sim.integrator.timestep * 1e-6 / sim.wall_time * 86400
    if "uncertainty_eV_per_A" in log:
        summary["max_uncertainty_eV_per_A"] = float(np.nanmax(log["uncertainty_eV_per_A"]))
    return summary


def plot_log(log_path: str, png_path: str, title: str = "", target_temperature: Optional[float] = None) -> str:
    """A PNG with energies, conserved-energy drift, temperature and (committee) uncertainty vs time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(log_path)
    t = log["time_ps"]
    panels = 4 if "uncertainty_eV_per_A" in log else 3
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.2 * panels), sharex=True)
    axes[0].plot(t, log["potential_eV"] - log["potential_eV"][0], label="potential")
    axes[0].plot(t, log["kinetic_eV"] - log["kinetic_eV"][0], label="kinetic")
    axes[0].set_ylabel("ΔE (eV)")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(t, log["total_eV"] - log["total_eV"][0], label="total", color="0.6")
    axes[1].plot(t, log["conserved_eV"] - log["conserved_eV"][0], label="conserved", color="k")
    axes[1].set_ylabel("ΔE (eV)")
    axes[1].legend(loc="upper right", fontsize=8)
    axes[2].plot(t, log["temperature_K"], color="C3")
    if target_temperature:
        axes[2].axhline(target_temperature, color="k", ls="--", lw=0.8)
    axes[2].set_ylabel("T (K)")
    if panels == 4:
        axes[3].plot(t, log["uncertainty_eV_per_A"], color="C4")
        axes[3].set_ylabel("σ_F max (eV/Å)")
    axes[-1].set_xlabel("time (ps)")
    if title:
        axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
