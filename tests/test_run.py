"""`mlmd run`: config validation, outputs, exact restart through the CLI."""
import os

import numpy as np
import pytest

from mlmd.cli import main
from mlmd.md.run import RunConfig, read_log
from mlmd.errors import InputError


@pytest.fixture()
def cu_config(tmp_path):
    from ase.build import bulk
    from mlmd.models.pair import export_morse

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    atoms.write(tmp_path / "cu.extxyz")
    export_morse(tmp_path / "cu.pt", cutoff=5.0, committee_size=2, spread=0.02)

    def write(**changes):
        config = {"structure": "cu.extxyz", "model": "cu.pt", "integrator": "langevin", "timestep": 2.0,
                  "temperature": 300, "steps": 200, "seed": 4, "trajectory_interval": 20,
                  "log_interval": 10, "checkpoint_interval": 50, "output": str(tmp_path / "out"),
                  "plot": True}
        config.update(changes)
        import yaml
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)
    return write


def test_run_writes_outputs(cu_config, tmp_path, capsys):
    assert main(["run", cu_config(), "--no-progress"]) == 0
    out = tmp_path / "out"
    for name in ("log.csv", "trajectory.dcd", "topology.pdb", "checkpoint.npz", "summary.png", "config.yaml"):
        assert (out / name).is_file(), name
    log = read_log(str(out / "log.csv"))
    assert list(log["step"].astype(int)) == list(range(0, 201, 10))
    assert np.all(log["uncertainty_eV_per_A"] > 0)
    mdtraj = pytest.importorskip("mdtraj")
    traj = mdtraj.load(str(out / "trajectory.dcd"), top=str(out / "topology.pdb"))
    assert traj.n_frames == 11 and traj.n_atoms == 32
    assert traj.unitcell_lengths is not None and np.allclose(traj.unitcell_lengths[0], 0.722, atol=1e-3)
    printed = capsys.readouterr().out
    assert "ns/day" in printed and "mean T" in printed
    # a second run into the same folder is refused, nothing overwritten
    before = (out / "log.csv").read_bytes()
    assert main(["run", cu_config(), "--no-progress"]) == 2
    assert (out / "log.csv").read_bytes() == before


@pytest.mark.parametrize("trajectory", ["trajectory.dcd", "trajectory.extxyz", "trajectory.xtc"])
def test_cli_restart_continues_exactly(cu_config, tmp_path, trajectory):
    """A run cut at step 120 (after its checkpoint at 100) and restarted equals one straight run."""
    assert main(["run", cu_config(trajectory=trajectory, output=str(tmp_path / "straight")),
                 "--no-progress"]) == 0
    cut = str(tmp_path / "cut")
    assert main(["run", cu_config(trajectory=trajectory, output=cut, steps=100), "--no-progress"]) == 0
    # simulate frames written after the last checkpoint by a run that then crashed
    with open(os.path.join(cut, "log.csv"), "a") as handle:
        handle.write("110,0.22,1,1,1,1,1,1,1\n")
    assert main(["run", cu_config(trajectory=trajectory, output=cut), "--restart", "--no-progress"]) == 0
    straight = read_log(str(tmp_path / "straight" / "log.csv"))
    resumed = read_log(os.path.join(cut, "log.csv"))
    for key in straight:
        assert np.array_equal(straight[key], resumed[key]), key
    import ase.io
    mdtraj = pytest.importorskip("mdtraj")
    if trajectory.endswith("extxyz"):
        a = np.array([f.positions for f in ase.io.read(tmp_path / "straight" / trajectory, ":")])
        b = np.array([f.positions for f in ase.io.read(os.path.join(cut, trajectory), ":")])
    else:
        a = mdtraj.load(str(tmp_path / "straight" / trajectory), top=str(tmp_path / "straight" / "topology.pdb")).xyz
        b = mdtraj.load(os.path.join(cut, trajectory), top=os.path.join(cut, "topology.pdb")).xyz
    assert a.shape == b.shape == (11, 32, 3)
    assert np.array_equal(a, b)


def test_config_errors(cu_config, tmp_path):
    with pytest.raises(InputError, match="unknown key.*'tempreature'"):
        RunConfig.from_file(cu_config(tempreature=300))
    path = cu_config()
    import yaml
    raw = yaml.safe_load(open(path))
    del raw["steps"]
    with pytest.raises(InputError, match="missing required key.*steps"):
        RunConfig.from_dict(raw)
    with pytest.raises(InputError, match="integrator"):
        RunConfig.from_file(cu_config(integrator="nose"))
    with pytest.raises(InputError, match="timestep"):
        RunConfig.from_file(cu_config(timestep=0))
    with pytest.raises(InputError, match="structure.*does not exist"):
        RunConfig.from_file(cu_config(structure="missing.xyz"))
    with pytest.raises(InputError, match="trajectory"):
        RunConfig.from_file(cu_config(trajectory="traj.nc"))
    with pytest.raises(InputError, match="temperature"):
        RunConfig.from_file(cu_config(temperature=None))
    with pytest.raises(InputError, match="restart"):
        from mlmd.md.run import run
        run(RunConfig.from_file(cu_config(output=str(tmp_path / "fresh"))), restart=True)
    assert main(["run", str(tmp_path / "nowhere.yaml")]) == 2


def test_read_structure_formats(tmp_path):
    """PDB (with CRYST1 -> periodic cell) through ASE; GROMACS .gro through mdtraj or ASE."""
    from ase.build import bulk
    from mlmd.md.io import read_structure

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.write(tmp_path / "cu.pdb")
    back = read_structure(tmp_path / "cu.pdb")
    assert len(back) == 32 and back.pbc.all()
    assert np.allclose(back.cell.lengths(), 7.22, atol=1e-3)
    assert np.allclose(back.positions, atoms.positions, atol=1e-3)
    with pytest.raises(InputError, match="structure"):
        read_structure(tmp_path / "missing.pdb")
    (tmp_path / "junk.xyz").write_text("not a structure\n")
    with pytest.raises(InputError, match="structure"):
        read_structure(tmp_path / "junk.xyz")


def test_topology_pdb_carries_the_bonds(tmp_path):
    """topology.pdb next to a DCD has CONECT records: mdtraj sees ethanol's 8 bonds (it saw 0),
    and no metal-metal 'bonds' in copper."""
    import ase.io
    mdtraj = pytest.importorskip("mdtraj")
    from ase.build import bulk
    from conftest import ETHANOL_DIR
    from mlmd.md.io import write_topology_pdb

    ethanol = ase.io.read(os.path.join(ETHANOL_DIR, "ethanol.xyz"))
    top = mdtraj.load(write_topology_pdb(tmp_path / "ethanol.pdb", ethanol)).topology
    assert top.n_bonds == 8
    assert sorted(sorted((b[0].element.symbol, b[1].element.symbol)) for b in top.bonds) == sorted(
        [["C", "C"], ["C", "O"], ["H", "O"]] + [["C", "H"]] * 5)
    copper = bulk("Cu", "fcc", a=3.61, cubic=True)
    assert mdtraj.load(write_topology_pdb(tmp_path / "cu.pdb", copper)).topology.n_bonds == 0


def test_run_without_openmm(cu_config, tmp_path, monkeypatch, capsys):
    """With OpenMM absent (`pip install mlmd`), `mlmd run` writes extxyz by default; a DCD asked
    for is refused up front with the install hint, before any file of the run exists."""
    import sys

    for name in [m for m in sys.modules if m == "openmm" or m.startswith("openmm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "openmm", None)      # import openmm -> ImportError
    assert RunConfig.from_file(cu_config()).trajectory == "trajectory.extxyz"
    assert main(["run", cu_config(trajectory="t.dcd", output=str(tmp_path / "dcd")), "--no-progress"]) == 2
    assert "pip install 'mlmd[openmm]'" in capsys.readouterr().err
    assert not (tmp_path / "dcd").exists()
    assert main(["run", cu_config(steps=20), "--no-progress"]) == 0
    assert (tmp_path / "out" / "trajectory.extxyz").is_file() and not (tmp_path / "out" / "topology.pdb").exists()


_CORE_IMPORTS = """
import sys
import ase.build, numpy as np
import mlmd, mlmd.models.train, mlmd.md.run, mlmd.plugins.ase
from mlmd.models.ponita import PonitaPotential
from mlmd.uncertainty.scores import spearman
PonitaPotential([1, 8], committee_size=2)
spearman(np.arange(5.0), np.arange(5.0))
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_core_dependencies_are_declared():
    """Every third-party distribution the core (train, run, the engine, the ASE calculator, the
    built-in model) imports is a declared dependency or one of theirs: scipy was imported by
    every `mlmd train` and not declared."""
    import importlib.metadata as metadata
    import re
    import subprocess
    import sys
    import tomllib
    from conftest import ROOT

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        declared = tomllib.load(handle)["project"]["dependencies"]
    name = lambda requirement: re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
    covered, todo = set(), [name(d) for d in declared]
    while todo:                       # the declared ones and everything they require
        dist = todo.pop()
        if dist in covered:
            continue
        covered.add(dist)
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [name(r) for r in requires if "extra ==" not in r]
    modules = subprocess.run([sys.executable, "-c", _CORE_IMPORTS], capture_output=True, text=True,
                             check=True).stdout.split()
    owners = metadata.packages_distributions()
    # torch imports opt_einsum when it happens to be installed, and needs it not
    optional = {"mlmd", "opt-einsum"}
    used = {name(dist) for module in modules if module not in sys.stdlib_module_names
            for dist in owners.get(module, []) if name(dist) not in optional}
    assert used, modules
    assert used <= covered, f"imported but not declared: {sorted(used - covered)}"


def test_run_threads_key_and_flag(cu_config):
    import torch

    before = torch.get_num_threads()
    try:
        with pytest.raises(InputError, match="threads"):
            RunConfig.from_file(cu_config(threads=0))
        assert RunConfig.from_file(cu_config(threads=2)).threads == 2
        assert main(["run", cu_config(steps=10, threads=2), "--threads", "1", "--no-progress"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
