"""Faults and bad input (issue 19): nothing already written is lost, nothing wrong is silent.

Each test drives the real component (``mlmd run`` in a subprocess that is killed with
SIGKILL, OpenMM, openmm-torch, ASE, EMT); only the fault itself is injected where no real
mechanism exists in a test (a torn frame, a full disk without a tmpfs).
"""
import os
import re
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from mlmd.cli import main
from mlmd.errors import InputError, MLMDError
from mlmd.md.run import RunConfig, read_log

MLMD = [sys.executable, "-m", "mlmd.cli"]


@pytest.fixture()
def cu(tmp_path):
    """write(**changes) -> path of a run.yaml for 32 rattled Cu atoms with a Morse committee of 2
    (a few hundred microseconds per step)."""
    from ase.build import bulk
    from mlmd.models.pair import export_morse

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    atoms.write(tmp_path / "cu.extxyz")
    export_morse(tmp_path / "cu.pt", cutoff=5.0, committee_size=2, spread=0.02)

    def write(name="run.yaml", **changes):
        config = {"structure": "cu.extxyz", "model": "cu.pt", "integrator": "langevin", "timestep": 2.0,
                  "temperature": 300, "steps": 200, "seed": 4, "trajectory_interval": 20,
                  "log_interval": 10, "checkpoint_interval": 50, "output": str(tmp_path / "out"),
                  "plot": False}
        config.update(changes)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        return str(path)
    return write


def _frames(path, top):
    mdtraj = pytest.importorskip("mdtraj")
    return mdtraj.load(str(path), top=str(top)).xyz


# ---- data already written ----------------------------------------------------------------------

def _tear(path, fmt):
    """What a kill in the middle of writing one more frame leaves behind."""
    with open(path, "r+b") as handle:
        if fmt == "dcd":                  # writeModel counts the frame in the header first ...
            count = struct.unpack("<i", handle.read(12)[8:12])[0]
            handle.seek(8)
            handle.write(struct.pack("<i", count + 1))
            handle.seek(0, os.SEEK_END)
            handle.write(b"\x30\x00\x00\x00" + b"\x01" * 150)   # ... then the kill, 154 bytes in
        elif fmt == "xtc":
            first = handle.read(200)
            handle.seek(0, os.SEEK_END)
            handle.write(first[:150])     # a frame header and part of its coordinates
        else:
            handle.seek(0, os.SEEK_END)
            handle.write(b"32\nLattice=\"7.22 0.0 0.0 0.0 7.22 0.0 0.0 0.0 7.22\" Properties=species:S:1:pos:R:3\n"
                         b"Cu 0.1 0.2 0.3\nCu 1.0 1.")


@pytest.mark.parametrize("fmt", ["dcd", "xtc", "extxyz"])
def test_restart_drops_only_a_torn_last_frame(cu, tmp_path, fmt):
    """A kill while a frame is being written (for DCD: between OpenMM's header update and the
    frame flush, so the header counts one frame more than the file holds) leaves a torn frame.
    The restart must cut exactly that frame (for DCD: frame size from the atom count, not file
    size / header count), check the file, and continue bit-identically to a straight run."""
    name = f"t.{fmt}"
    assert main(["run", cu(trajectory=name, output=str(tmp_path / "straight"), steps=300),
                 "--no-progress"]) == 0
    cut = tmp_path / "cut"
    assert main(["run", cu(trajectory=name, output=str(cut), steps=200), "--no-progress"]) == 0
    _tear(cut / name, fmt)
    assert main(["run", cu(trajectory=name, output=str(cut), steps=300), "--restart", "--no-progress"]) == 0
    if fmt == "extxyz":
        import ase.io
        straight = np.array([a.positions for a in ase.io.read(tmp_path / "straight" / name, ":")])
        resumed = np.array([a.positions for a in ase.io.read(cut / name, ":")])
    else:
        straight = _frames(tmp_path / "straight" / name, tmp_path / "straight" / "topology.pdb")
        resumed = _frames(cut / name, cut / "topology.pdb")
    assert straight.shape == resumed.shape == (16, 32, 3)
    assert np.array_equal(straight, resumed)


def test_dcd_restart_refuses_a_file_shorter_than_the_checkpoint(cu, tmp_path):
    """Frames the checkpoint counts but the file lacks are not invented: the restart refuses,
    names the file and both counts, and writes nothing."""
    out = tmp_path / "out"
    assert main(["run", cu(trajectory="t.dcd", steps=100), "--no-progress"]) == 0
    dcd = out / "t.dcd"
    size = os.path.getsize(dcd)
    os.truncate(dcd, size - 100)                        # the last of 6 frames torn
    before = dcd.read_bytes()
    with pytest.raises(InputError, match=r"t\.dcd.*5 complete frames.*checkpoint counts 6"):
        from mlmd.md.run import run
        run(RunConfig.from_file(cu(trajectory="t.dcd", steps=200)), restart=True, progress=False)
    assert dcd.read_bytes() == before


def _xtc_run(cu, tmp_path, steps):
    return cu(trajectory="t.xtc", trajectory_interval=1, checkpoint_interval=1000, log_interval=100,
              steps=steps)


def test_xtc_restart_never_rewrites_the_kept_frames(cu, tmp_path):
    """`--restart` of an XTC run used to reopen the file for writing and write the kept frames
    again: a kill in that window lost the trajectory.  Watch the real restart in a subprocess;
    the file must never be shorter than the frames the checkpoint counts.  If it is, kill -9 it
    there, as a user's job scheduler would, and check what is left."""
    out = tmp_path / "out"
    assert main(["run", _xtc_run(cu, tmp_path, 400), "--no-progress"]) == 0
    xtc = out / "t.xtc"
    kept = xtc.read_bytes()
    process = subprocess.Popen(MLMD + ["run", _xtc_run(cu, tmp_path, 450), "--restart", "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    smallest = len(kept)
    while process.poll() is None:
        size = os.path.getsize(xtc)
        smallest = min(smallest, size)
        if size < len(kept):
            process.send_signal(signal.SIGKILL)
            process.wait()
            break
    output = process.stdout.read().decode()
    assert smallest >= len(kept), (f"the restart cut the XTC file to {smallest} of {len(kept)} bytes "
                                   f"that the checkpoint covers; after kill -9 it holds "
                                   f"{os.path.getsize(xtc)} bytes")
    assert process.returncode == 0, output[-2000:]
    assert xtc.read_bytes()[:len(kept)] == kept
    assert _frames(xtc, out / "topology.pdb").shape == (451, 32, 3)


def test_output_folder_is_locked_while_a_run_writes(cu, tmp_path):
    """A second `mlmd run` on a folder in use (here a --restart, which passes every file guard)
    is refused while the first runs; the first one's log stays whole; kill -9 drops the lock."""
    out = tmp_path / "out"
    config = cu(steps=200000, checkpoint_interval=50)
    process = subprocess.Popen(MLMD + ["run", config, "--no-progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.npz").exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, process.stdout.read().decode()[-2000:]
        with pytest.raises(InputError, match=r"in use by another mlmd run \(pid \d+"):
            from mlmd.md.run import run
            run(RunConfig.from_file(config), restart=True, progress=False)
        assert main(["run", config, "--no-progress"]) == 2
        time.sleep(0.5)                       # the first run goes on writing its log
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    rows = (out / "log.csv").read_text().splitlines()
    steps = [int(row.split(",")[0]) for row in rows[1:] if row.count(",") == 8]
    assert steps == list(range(0, 10 * len(steps), 10)), steps[:20]
    # the kernel dropped the dead run's lock: the restart runs (to step 300 of the same config)
    assert main(["run", cu(steps=300, checkpoint_interval=50), "--restart", "--no-progress"]) == 0


def test_fresh_run_never_overwrites_files_of_another_run(cu, tmp_path):
    """A folder holding a trajectory, checkpoint and config but no log.csv, and a trajectory
    path outside the output folder onto an existing file: both refused, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    for name, data in (("t.dcd", b"precious frames"), ("checkpoint.npz", b"precious state"),
                       ("config.yaml", b"precious: config\n")):
        (out / name).write_bytes(data)
    assert main(["run", cu(trajectory="t.dcd"), "--no-progress"]) == 2
    assert (out / "t.dcd").read_bytes() == b"precious frames"
    assert (out / "checkpoint.npz").read_bytes() == b"precious state"
    assert not (out / "log.csv").exists()

    elsewhere = tmp_path / "elsewhere.dcd"
    elsewhere.write_bytes(b"someone else's trajectory")
    with pytest.raises(InputError, match="leaves the output folder.*allow_outside_output"):
        RunConfig.from_file(cu(trajectory="../elsewhere.dcd", output=str(tmp_path / "o2")))
    assert main(["run", cu(trajectory="../elsewhere.dcd", output=str(tmp_path / "o2"),
                           allow_outside_output=True), "--no-progress"]) == 2
    assert elsewhere.read_bytes() == b"someone else's trajectory"
    assert main(["run", cu(trajectory="../new.dcd", output=str(tmp_path / "o3"), allow_outside_output=True,
                           steps=20), "--no-progress"]) == 0
    assert (tmp_path / "new.dcd").stat().st_size > 0


class _Quota:
    """A disk that holds ``left`` more bytes under ``folder``: the write that would pass it
    writes what fits and raises ENOSPC, as write(2) does on a full file system."""

    def __init__(self, folder, left):
        import builtins
        self.folder, self.left, self.real_open = os.path.abspath(folder), left, builtins.open

    def open(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        inside = isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(self.folder)
        return _QuotaFile(handle, self) if inside and any(c in mode for c in "wax+") else handle


class _QuotaFile:
    def __init__(self, handle, quota):
        self._handle, self._quota = handle, quota

    def write(self, data):
        import errno
        size = len(data.encode() if isinstance(data, str) else bytes(data))
        if size > self._quota.left:
            self._handle.write(data[:self._quota.left])
            self._handle.flush()
            self._quota.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._quota.left -= size
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)


def _disk_full_then_restart(cu, tmp_path, capsys, fill, free):
    """Run into a disk that fills up (``fill``), check the message and what is on disk, free
    space (``free``) and --restart: the result equals a straight run."""
    from mlmd.md.simulation import Simulation

    straight = tmp_path / "straight"
    assert main(["run", cu(trajectory="t.dcd", output=str(straight), steps=1000), "--no-progress"]) == 0
    out = fill()
    config = cu(trajectory="t.dcd", output=str(out), steps=1000)
    capsys.readouterr()
    assert main(["run", config, "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert "disk is full" in message and "Intact: checkpoint.npz of step" in message, message
    assert "--restart" in message and "Traceback" not in message
    step = int(message.split("checkpoint.npz of step ")[1].split()[0])
    assert 0 < step < 1000
    assert not (out / "checkpoint.npz.tmp").exists()
    sim = Simulation(str(tmp_path / "cu.extxyz"), str(tmp_path / "cu.pt"), integrator="langevin", timestep=2.0,
                     temperature=300, seed=4)
    sim.load_checkpoint(str(out / "checkpoint.npz"))
    assert sim.state.step == step
    free()
    assert main(["run", config, "--restart", "--no-progress"]) == 0
    a, b = read_log(str(straight / "log.csv")), read_log(str(out / "log.csv"))
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert np.array_equal(_frames(straight / "t.dcd", straight / "topology.pdb"),
                          _frames(out / "t.dcd", out / "topology.pdb"))
    print(f"disk full after the checkpoint of step {step}")
    return step


def test_disk_full_says_what_is_intact_and_restarts_exactly(cu, tmp_path, capsys, monkeypatch):
    """A full disk (ENOSPC from the 400,000th byte written into the run folder) ends with a message,
    not a traceback, that names the intact checkpoint; after space is freed, --restart gives the
    straight run's log and trajectory exactly."""
    import builtins

    quota = _Quota(tmp_path / "out", 400_000)

    def fill():
        monkeypatch.setattr(builtins, "open", quota.open)
        return tmp_path / "out"

    def free():
        monkeypatch.setattr(builtins, "open", quota.real_open)

    assert _disk_full_then_restart(cu, tmp_path, capsys, fill, free) > 0   # asserts inside: log, frames equal


def test_disk_full_on_a_real_tmpfs(cu, tmp_path, capsys):
    """The same on a real 240 kB tmpfs (needs root to mount; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert _disk_full_then_restart(                       # asserts inside: log, frames equal
            cu, tmp_path, capsys, lambda: disk / "out",
            lambda: subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)) > 0
    finally:
        subprocess.run(["umount", str(disk)])


def test_restart_with_another_model_file_is_refused_unless_asked(cu, tmp_path):
    from mlmd.models.pair import export_morse

    assert main(["run", cu(steps=100), "--no-progress"]) == 0
    export_morse(tmp_path / "other.pt", cutoff=5.0, committee_size=2, spread=0.05)
    other = cu(steps=200, model="other.pt")
    with pytest.raises(InputError, match=r"written with the model file .*cu\.pt.*this run uses .*other\.pt"):
        from mlmd.md.run import run
        run(RunConfig.from_file(other), restart=True, progress=False)
    assert read_log(str(tmp_path / "out" / "log.csv"))["step"][-1] == 100
    assert main(["run", other, "--restart", "--allow-model-change", "--no-progress"]) == 0
    assert read_log(str(tmp_path / "out" / "log.csv"))["step"][-1] == 200


# ---- a wrong label enters training -----------------------------------------------------------------

class SharedGeometryEMT:
    """EMT the way tblite and other codes with a library behind them work: the geometry lives
    inside the calculator object (set at the start of each calculation, read at the end, after
    the "SCF" time) and one calculation gives energy, forces and stress.  ``delays``: seconds
    per calculation, by frame name.  Not thread safe, like the real ones."""

    def __new__(cls, delays):
        from ase.calculators.calculator import Calculator, all_changes
        from ase.calculators.emt import EMT

        class _SharedGeometryEMT(Calculator):
            implemented_properties = ["energy", "forces", "stress"]

            def __init__(self, delays):
                super().__init__()
                self.delays = delays
                self.geometry = None

            def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
                super().calculate(atoms, properties, system_changes)
                self.geometry = self.atoms.copy()                 # the library's own copy
                time.sleep(self.delays.get(self.atoms.info.get("name"), 0.0))
                geometry = self.geometry.copy()                    # what the library computes on
                geometry.calc = EMT()
                self.results = {"energy": geometry.get_potential_energy(), "forces": geometry.get_forces(),
                                "stress": geometry.get_stress()}

        return _SharedGeometryEMT(delays)


def test_a_timed_out_oracle_never_labels_the_next_frame(tmp_path):
    """Frame A times out (0.72 s > 0.6 s) and its thread goes on with the same calculator object:
    when its energy comes back it asks for the forces, and ASE recomputes frame A, which sets
    the object's geometry back to A while frame B's calculation is running; B's label then held
    A's energy.  Every label that comes out must be EMT's numbers for its own frame."""
    import ase.io
    from ase.calculators.emt import EMT
    from mlmd.active import label_frames
    from conftest import ROOT

    frames = ase.io.read(os.path.join(ROOT, "systems", "copper", "data.extxyz"), ":2")
    for name, atoms in zip("AB", frames):
        atoms.calc = None
        atoms.info["name"] = name
    oracle = SharedGeometryEMT({"A": 0.72, "B": 0.25})
    labels = label_frames(frames, oracle, timeout=0.6)
    assert not labels[0].ok and "TimeoutError" in labels[0].error
    assert labels[1].ok, labels[1].error
    reference = frames[1].copy()
    reference.calc = EMT()
    got = labels[1].frame.calc.results
    assert got["energy"] == pytest.approx(reference.get_potential_energy(), abs=1e-9), \
        f"frame B labelled {got['energy'] - reference.get_potential_energy():+.3f} eV off"
    np.testing.assert_allclose(got["forces"], reference.get_forces(), atol=1e-9)
    np.testing.assert_allclose(got["stress"], reference.get_stress(), atol=1e-12)
    time.sleep(1.5)                      # let A's thread finish before the next test


def test_a_label_is_checked_against_its_frame(tmp_path):
    """An oracle that returns forces of the wrong shape, or NaN, gives no label."""
    import ase.io
    from ase.calculators.calculator import Calculator
    from mlmd.active import label_frames
    from conftest import ROOT

    class Broken(Calculator):
        implemented_properties = ["energy", "forces"]

        def __init__(self, forces):
            super().__init__()
            self.forces = forces

        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            super().calculate(atoms, properties, system_changes)
            self.results = {"energy": -1.0, "forces": self.forces(len(self.atoms))}

    frame = ase.io.read(os.path.join(ROOT, "systems", "copper", "data.extxyz"), "0")
    frame.calc = None
    for forces, why in ((lambda n: np.zeros((n - 1, 3)), "shape"), (lambda n: np.full((n, 3), np.nan), "NaN")):
        labels = label_frames([frame], Broken(forces))
        assert not labels[0].ok and why in labels[0].error, labels[0].error


def test_dask_without_workers_fails_the_batch_instead_of_hanging():
    """A cluster with no worker (`dask: local` with `workers: 0`, or a scheduler whose workers
    died) used to wait forever.  workers: 0 is refused up front; a wait on a worker-less
    cluster gives up after worker_timeout and the batch is reported as failed labels."""
    import threading
    import ase.io
    from distributed import Client, LocalCluster
    from mlmd.active import labeling, make_client
    from conftest import ROOT

    with pytest.raises(InputError, match="workers.*>= 1"):
        make_client("local", workers=0)
    frames = ase.io.read(os.path.join(ROOT, "systems", "copper", "data.extxyz"), ":2")
    for atoms in frames:
        atoms.calc = None
    cluster = LocalCluster(n_workers=0, processes=False, dashboard_address=None)
    client = Client(cluster)
    result = {}
    old = labeling.WORKER_TIMEOUT
    labeling.WORKER_TIMEOUT = 2.0
    try:
        thread = threading.Thread(target=lambda: result.update(
            labels=labeling.label_frames(frames, "emt", client=client)), daemon=True)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), "label_frames still waiting on a cluster without workers after 30 s"
    finally:
        labeling.WORKER_TIMEOUT = old
        client.close()
        cluster.close()
    assert [label.ok for label in result["labels"]] == [False, False]
    assert "no worker" in result["labels"][0].error


def _copper_learn(tmp_path, **changes):
    import ase.io
    from conftest import ROOT

    frames = ase.io.read(os.path.join(ROOT, "systems", "copper", "data.extxyz"), ":")
    ase.io.write(tmp_path / "train.extxyz", frames[:8])
    ase.io.write(tmp_path / "val.extxyz", frames[-4:])
    start = frames[0].copy()
    start.calc = None
    ase.io.write(tmp_path / "cu32.xyz", start)
    config = {"structure": "cu32.xyz", "model": os.path.join(ROOT, "systems", "copper", "copper_committee.pt"),
              "oracle": "emt", "train_data": "train.extxyz", "val_data": "val.extxyz", "integrator": "langevin",
              "temperature": 1500, "timestep": 2.0, "steps": 2000, "sigma_lo": 0.02, "sigma_hi": 5.0,
              "batch_size": 2, "dedup_rmsd": 0.01, "check_interval": 10, "trajectory": "trajectory.extxyz",
              "trajectory_interval": 10, "checkpoint_interval": 10, "log_interval": 10,
              "finetune": {"epochs": 20, "batch_size": 4}, "output": str(tmp_path / "out"), "plot": False}
    config.update(changes)
    (tmp_path / "learn.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "learn.yaml")


@pytest.mark.slow
def test_ctrl_c_stops_mlmd_learn_with_dask(tmp_path):
    """Ctrl-C while `mlmd learn` waits on its Dask cluster (labels, member training) ends the
    run within 20 s with exit 130 and a checkpoint, without the final refit (red before: still
    running 60 s after SIGINT).  About 25 s: a LocalCluster and a learning run start."""
    config = _copper_learn(tmp_path, dask="local", workers=1, final_finetune={"epochs": 200})
    labels = tmp_path / "out" / "active" / "labels.extxyz"
    process = subprocess.Popen(MLMD + ["learn", config, "--no-progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline and \
            (not labels.exists() or labels.read_text().count("Lattice") < 2):
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read().decode()[-2000:]
    time.sleep(1.0)                       # into the retraining on the cluster
    process.send_signal(signal.SIGINT)
    try:
        output = process.communicate(timeout=20)[0].decode()
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("mlmd learn still running 20 s after Ctrl-C: " + process.communicate()[0].decode()[-2000:])
    assert process.returncode == 130, output[-2000:]
    assert "interrupted: checkpoint written" in output and "final refit" not in (tmp_path / "out" / "learn.csv").read_text()
    assert labels.read_text().count("Lattice") >= 2


# ---- broken states are never silent ------------------------------------------------------------------

def _ethanol(case):
    """Ethanol with atoms 0 and 1 at one position ("overlap") or hydrogen 8 pulled 20 Å away ("isolated")."""
    import ase.io
    from conftest import ETHANOL_DIR

    atoms = ase.io.read(os.path.join(ETHANOL_DIR, "ethanol.xyz"))
    if case == "overlap":
        atoms.positions[1] = atoms.positions[0]
    elif case == "isolated":
        atoms.positions[8] += [20.0, 0.0, 0.0]
    return atoms


def test_engine_stops_on_overlapping_atoms_and_non_finite_outputs(tmp_path, capsys):
    """Two atoms at one position gave NaN energy and forces and a run that went on."""
    from conftest import SHIPPED_MODEL
    from mlmd import Simulation
    from mlmd.guard import BrokenStateError

    with pytest.raises(BrokenStateError, match=r"step 0: atoms 0 and 1 are 0\.000 Å apart, closer than 0\.76 Å, half the sum of the covalent radii of C and C"):
        Simulation(_ethanol("overlap"), SHIPPED_MODEL, temperature=300, integrator="langevin")
    with pytest.raises(BrokenStateError, match=r"step 0: the model returned a non-finite energy and forces on atom"):
        Simulation(_ethanol("overlap"), SHIPPED_MODEL, temperature=300, integrator="langevin", min_distance=0)
    # through the CLI: a clear message and exit 2, no traceback
    _ethanol("overlap").write(tmp_path / "bad.xyz")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(
        {"structure": "bad.xyz", "model": SHIPPED_MODEL, "steps": 10, "temperature": 300,
         "output": str(tmp_path / "out"), "trajectory": "t.extxyz"}))
    assert main(["run", str(tmp_path / "run.yaml"), "--no-progress"]) == 2
    assert "atoms 0 and 1 are 0.000 Å apart" in capsys.readouterr().err


def test_engine_warns_about_atoms_that_left_every_neighbour(cu, tmp_path):
    """An atom pulled out of the crystal mid-run (here by an observer at step 10; in the field, by
    an explosion) is named with the step at which it has no neighbour left."""
    from mlmd import Simulation
    from mlmd.guard import IsolatedAtomsWarning

    import ase.io
    atoms = ase.io.read(tmp_path / "cu.extxyz")
    atoms.pbc = False                               # a 32-atom cluster
    sim = Simulation(atoms, str(tmp_path / "cu.pt"), integrator="verlet", timestep=1.0)
    assert len(sim.forces.isolated) == 0

    def pull(s):
        if s.state.step == 10:
            s.state.positions[5] += [30.0, 0.0, 0.0]
    sim.attach(pull, 10)
    with pytest.warns(IsolatedAtomsWarning, match=r"step 11: 1 atom\(s\) \[5\] have no neighbour within the cutoff"):
        sim.run(20)
    assert sim.forces.isolated.tolist() == [5]


def test_ase_calculator_stops_on_nan_and_warns_about_overlap_and_isolated_atoms():
    """Two atoms at one position: a warning naming them (an optimiser may probe such a geometry
    and reject it), then the NaN the model gives stops the calculation; an isolated atom is named."""
    from conftest import SHIPPED_MODEL
    from mlmd.guard import BrokenStateError, IsolatedAtomsWarning, OverlapWarning
    from mlmd.plugins.ase import MLMDCalculator

    atoms = _ethanol("overlap")
    atoms.calc = MLMDCalculator(SHIPPED_MODEL)
    with pytest.raises(BrokenStateError, match=r"ASE calculation 1: the model returned a non-finite energy"):
        with pytest.warns(OverlapWarning, match=r"ASE calculation 1: atoms 0 and 1 are 0\.000 Å apart"):
            atoms.get_potential_energy()
    atoms = _ethanol("isolated")
    atoms.calc = MLMDCalculator(SHIPPED_MODEL)
    with pytest.warns(IsolatedAtomsWarning, match=r"ASE calculation 1: 1 atom\(s\) \[8\]"):
        atoms.get_forces()
    assert atoms.calc.isolated.tolist() == [8]


def _openmm_context(force, positions_angstrom, n_particles):
    openmm = pytest.importorskip("openmm")
    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(12.0)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(np.asarray(positions_angstrom) * 0.1)
    return context


@pytest.mark.parametrize("path", ["python", "torch"])
def test_openmm_paths_stop_on_nan_and_check_the_particle_count(path, capfd):
    """Both OpenMM paths: two atoms at one position are named in a warning (OpenMM's minimiser
    probes such geometries on trial steps) and the NaN they give stops the evaluation; the
    TorchForce path refuses a System with one particle more than the force was made for (it gave
    that particle no force) or one fewer, with the PythonForce path's message."""
    pytest.importorskip("openmm")
    import warnings
    from conftest import SHIPPED_MODEL
    from mlmd.guard import IsolatedAtomsWarning
    from mlmd.plugins.openmm import create_force

    if path == "torch":
        pytest.importorskip("openmmtorch")
    ethanol = _ethanol(None)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Exception, match=r"non-finite energy"):
            _openmm_context(create_force(SHIPPED_MODEL, ethanol.numbers, path=path), _ethanol("overlap").positions,
                            9).getState(getEnergy=True)
    said = " ".join(str(w.message) for w in caught) + capfd.readouterr().err    # TorchForce: libtorch's stderr
    assert re.search(r"(atoms|particles) 0 and 1 are 0\.000 (Å|A) apart, closer than 0\.76", said), said
    extra = np.vstack([ethanol.positions, [[5.0, 5.0, 5.0]]])
    for positions, n in ((extra, 10), (ethanol.positions[:8], 8)):
        with pytest.raises(Exception, match=f"describes 9 particles but OpenMM passed {n} particles"):
            _openmm_context(create_force(SHIPPED_MODEL, ethanol.numbers, path=path), positions, n) \
                .getState(getEnergy=True, getForces=True)
    isolated = _ethanol("isolated")
    context = _openmm_context(create_force(SHIPPED_MODEL, ethanol.numbers, path=path), isolated.positions, 9)
    if path == "python":
        with pytest.warns(IsolatedAtomsWarning, match=r"OpenMM step 0: 1 atom\(s\) \[8\]"):
            context.getState(getEnergy=True)
    else:
        capfd.readouterr()
        context.getState(getEnergy=True)
        assert "1 particle(s) [8] have no neighbour within the cutoff (5.00 A)" in capfd.readouterr().err


def test_learning_loop_does_not_trust_a_frame_with_an_isolated_atom():
    """σ is 0 for an atom without neighbours, so a blown-apart frame looked trusted."""
    from conftest import SHIPPED_MODEL
    from mlmd import Simulation
    from mlmd.active import ActiveLearner
    from mlmd.active.hosts import EngineHost
    from mlmd.uncertainty import LOST, TRUSTED, Trigger, TrustLevels

    class NoHook:
        def on_candidates(self, frames):
            return None

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = Simulation(_ethanol("isolated"), SHIPPED_MODEL, integrator="verlet")
    learner = ActiveLearner(NoHook(), Trigger(TrustLevels(50.0, 100.0)), rollback=False)
    assert learner.check(EngineHost(sim)) == LOST
    sim = Simulation(_ethanol(None), SHIPPED_MODEL, integrator="verlet")
    assert learner.check(EngineHost(sim)) == TRUSTED


# ---- bad input, up front ------------------------------------------------------------------------------

def test_model_file_whose_metadata_disagrees_with_its_module_is_refused(tmp_path):
    """A file whose metadata says cutoff 5.0 Å around a module built for 4.0 Å was used with 5.0 Å
    pairs (wrong energies)."""
    import json
    import torch
    from conftest import make_model
    from mlmd import keys
    from mlmd.errors import ModelFileError
    from mlmd.potential import export, load_module

    path = export(make_model(committee=2), tmp_path / "m.pt", {"model_family": "ponita"}, dtype="float64")
    module, meta = load_module(path)
    for key, value in ((keys.META_CUTOFF, 5.0), (keys.META_SPECIES, [1, 6, 7]), (keys.META_COMMITTEE, 4)):
        edited = dict(meta, **{key: value})
        torch.jit.save(module, str(tmp_path / "edited.pt"),
                       _extra_files={keys.METADATA_FILE: json.dumps(edited)})
        with pytest.raises(ModelFileError, match=f"metadata says {key} = .* but the module was built with"):
            load_module(tmp_path / "edited.pt")


def test_config_values_are_checked_by_type_before_anything_runs(cu, tmp_path):
    """Quoted booleans were truthy, `lr: 1e-3` (text in YAML 1.1) was a TypeError in the first
    retraining, a negative oracle timeout failed after MD had started, workers: 0 hung."""
    from mlmd.active.learn import LearnConfig

    with pytest.raises(InputError, match=r"remove_com: must be true or false, got 'false'.*without quotes"):
        RunConfig.from_file(cu(remove_com="false"))
    with pytest.raises(InputError, match=r"plot: must be true or false, got 'no'"):
        RunConfig.from_file(cu(plot="no"))
    with pytest.raises(InputError, match=r"timestep: must be a number, got '2e0'.*1\.0e-3"):
        RunConfig.from_file(cu(timestep="2e0"))
    with pytest.raises(InputError, match=r"fixed: must be a list of"):
        RunConfig.from_file(cu(fixed=[0, "1"]))
    cases = [({"finetune": {"epochs": 2, "lr": "1e-3"}}, r"finetune\.lr: must be a number, got '1e-3'"),
             ({"final_finetune": {"epochs": "10"}}, r"final_finetune\.epochs: must be a whole number"),
             ({"oracle_timeout": -1}, r"oracle_timeout: must be a positive number of seconds"),
             ({"workers": 0, "dask": "local"}, r"workers: must be a whole number >= 1"),
             ({"rollback": "no"}, r"rollback: must be true or false"),
             ({"dask": "lokal"}, r"dask: expected none, local or a scheduler address"),
             ({"oracle": {"openmm": {"topology": "x.pdb", "forcefeild": ["amber14/tip3pfb.xml"]}}},
              r"oracle\.openmm: unknown key\(s\) \['forcefeild'\]")]
    for change, message in cases:
        with pytest.raises(InputError, match=message):
            LearnConfig.from_file(_copper_learn(tmp_path, **change))
    assert not (tmp_path / "out").exists()


def test_learn_state_is_relative_to_its_folder_and_a_fresh_run_never_resumes_old_state(tmp_path):
    """state.json held paths relative to the working directory (a moved run folder could not
    restart); a fresh `mlmd learn` into a folder holding an old active/ silently resumed it."""
    import json
    import shutil
    from mlmd.active.hooks import RetrainingHook
    from conftest import ROOT

    copper = os.path.join(ROOT, "systems", "copper")
    hook = RetrainingHook(os.path.join(copper, "copper_committee.pt"), "emt", str(tmp_path / "run" / "active"),
                          train_data=os.path.join(copper, "data.extxyz"))
    hook.state.update(generation=1, model=hook._stored(str(tmp_path / "run" / "active" / "models" / "g1.pt")))
    shutil.copy(os.path.join(copper, "copper_committee.pt"), tmp_path / "run" / "active" / "models" / "g1.pt")
    hook._save_state()
    state = json.loads((tmp_path / "run" / "active" / "state.json").read_text())
    assert state["model"] == os.path.join("models", "g1.pt")
    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    again = RetrainingHook(os.path.join(copper, "copper_committee.pt"), "emt", str(tmp_path / "moved" / "active"))
    assert os.path.samefile(again.potential.path, tmp_path / "moved" / "active" / "models" / "g1.pt")

    config = _copper_learn(tmp_path, output=str(tmp_path / "moved"), steps=20)
    assert main(["learn", config, "--no-progress"]) == 2           # refused: active/ of another run
    assert json.loads((tmp_path / "moved" / "active" / "state.json").read_text())["generation"] == 1
    assert not (tmp_path / "moved" / "log.csv").exists()


def test_import_mace_refuses_files_that_are_not_mace_models_before_unpickling(tmp_path):
    """A pickle that would run a shell command, a non-zip file and a torch.save of something
    else are refused without being unpickled; a real MACE .model file passes the check."""
    pytest.importorskip("mace")
    import pickle
    import torch
    from mlmd.plugins.mace import check_mace_file, load_mace_model

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save(Payload(), tmp_path / "evil.model")
    (tmp_path / "plain.model").write_bytes(pickle.dumps({"a": 1}))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.model")
    for name, message in (("evil.model", r"refers to \['(posix|os)\.system'\]"), ("plain.model", "not a torch.save archive"),
                          ("dict.model", "holds no MACE model class")):
        with pytest.raises(InputError, match=message):
            load_mace_model(tmp_path / name)
    assert not marker.exists()
    assert main(["import-mace", str(tmp_path / "evil.model"), "--out", str(tmp_path / "x.pt")]) == 2
    assert not marker.exists()
    from test_mace_plugin import small_mace
    torch.save(small_mace(0), tmp_path / "real.model")
    check_mace_file(str(tmp_path / "real.model"))


def test_import_mace_help_says_it_unpickles():
    import subprocess as sp
    out = sp.run(MLMD + ["import-mace", "--help"], capture_output=True, text=True).stdout
    assert "unpickl" in out.lower() and "trust" in out
    from conftest import ROOT
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "unpickles the `.model` files" in readme and "A System XML holding a PythonForce is code" in readme


def test_learn_restart_refuses_a_changed_model_file(tmp_path):
    """`mlmd learn --restart` resumes with the generation file the checkpoint ran with (recorded
    relative to the run folder, with its SHA-256): a file replaced since is refused."""
    import shutil
    from mlmd.active.learn import LearnConfig, LearningExtension
    from mlmd.md.simulation import model_sha256
    from conftest import ROOT

    extension = LearningExtension(LearnConfig.from_file(_copper_learn(tmp_path)))
    models = tmp_path / "out" / "active" / "models"
    models.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "systems", "copper", "copper_committee.pt"), models / "generation_001.pt")
    extra = {"model_in_use": os.path.join("active", "models", "generation_001.pt"),
             "model_in_use_sha256": model_sha256(str(models / "generation_001.pt"))}
    extension._check_model_in_use(extra)                       # unchanged: fine
    shutil.copy(os.path.join(ROOT, "systems", "ethanol", "ethanol_committee.pt"), models / "generation_001.pt")
    with pytest.raises(InputError, match=r"generation_001\.pt.*which has changed"):
        extension._check_model_in_use(extra)
