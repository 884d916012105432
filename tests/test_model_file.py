"""Export, load, metadata and bad input at the public entry points."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mlmd
from mlmd import keys
from mlmd.errors import DataError, InputError, ModelFileError

from conftest import ETHANOL_DATA, make_model


def test_export_then_load_in_fresh_process_is_bitwise(tmp_path, ethanol):
    from mlmd.potential import export

    for dtype in ("float32", "float64"):
        path = tmp_path / f"m_{dtype}.pt"
        export(make_model(committee=2, seed=11), path, {"model_family": "ponita"}, dtype=dtype)
        here = mlmd.load(path).compute_atoms(ethanol)
        script = (
            "import numpy as np, mlmd, ase.io, sys\n"
            f"atoms = ase.io.read({str(os.path.join(os.path.dirname(ETHANOL_DATA), 'ethanol.xyz'))!r})\n"
            f"out = mlmd.load({str(path)!r}).compute_atoms(atoms)\n"
            f"np.savez({str(tmp_path / 'out.npz')!r}, **out)\n")
        subprocess.run([sys.executable, "-c", script], check=True)
        there = np.load(tmp_path / "out.npz")
        assert set(there.files) == set(here)
        for key in here:
            assert there[key].dtype == here[key].dtype == np.dtype(dtype)
            assert np.array_equal(there[key], here[key]), f"{key} differs after reload ({dtype})"


def test_shipped_committees_give_the_same_numbers_under_torchscripts_legacy_executor(tmp_path):
    """Some codes switch TorchScript to its legacy executor for the whole process
    (torch._C._jit_set_profiling_executor(False)); the shipped files must run there too."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    models = [os.path.join(root, "systems", "copper", "copper_committee.pt"),
              os.path.join(root, "systems", "ethanol", "ethanol_committee.pt")]
    script = (
        "import sys, torch\n"
        "torch._C._jit_set_profiling_executor(False)\n"
        "import numpy as np, mlmd\n"
        "from mlmd import testing\n"
        "for index, path in enumerate(sys.argv[2:]):\n"
        "    pot = mlmd.load(path)\n"
        "    atoms = testing.example_atoms(pot)\n"
        "    outs = [pot.compute_atoms(atoms) for _ in range(3)]\n"      # past the executor's first runs
        "    np.savez(f'{sys.argv[1]}/{index}.npz', **outs[-1])\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path), *models], check=True)
    from mlmd import testing
    for index, path in enumerate(models):
        pot = mlmd.load(path)
        here = pot.compute_atoms(testing.example_atoms(pot))
        there = np.load(tmp_path / f"{index}.npz")
        for key in ("energy", "forces", "uncertainty"):
            np.testing.assert_allclose(there[key], here[key], rtol=1e-5, atol=1e-5)


def test_metadata_and_info_command(model_file):
    pot = mlmd.load(model_file)
    meta = pot.metadata
    assert meta[keys.META_CONTRACT] == keys.CONTRACT_VERSION
    assert meta[keys.META_SPECIES] == [1, 6, 8]
    assert meta[keys.META_COMMITTEE] == 2
    assert meta[keys.META_CUTOFF] == 4.0
    assert meta[keys.META_DTYPE] == "float64"
    out = subprocess.run([sys.executable, "-m", "mlmd.cli", "info", model_file, "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)[keys.META_COMMITTEE] == 2
    table = subprocess.run([sys.executable, "-m", "mlmd.cli", "info", model_file],
                           capture_output=True, text=True, check=True).stdout
    assert "cutoff" in table and "committee_size" in table


def test_not_a_torchscript_archive(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a model\n")
    with pytest.raises(ModelFileError, match="not a TorchScript archive"):
        mlmd.load(path)
    with pytest.raises(ModelFileError, match="does not exist"):
        mlmd.load(tmp_path / "missing.pt")


def test_load_errors_keep_their_cause(model_file, tmp_path):
    """A load failure says what failed (no CUDA, a bad device name, a damaged archive), not only
    "not a TorchScript archive"."""
    from mlmd.errors import InputError

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            mlmd.load(model_file, device="cuda")
    with pytest.raises(InputError, match="device: 'gpu0' is not a torch device"):
        mlmd.load(model_file, device="gpu0")
    import zipfile
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(model_file) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith("data.pkl"):
                target.writestr(item, source.read(item))
    with pytest.raises(ModelFileError, match="torch could not load it") as caught:
        mlmd.load(damaged)
    assert caught.value.__cause__ is not None and "not a TorchScript archive" not in str(caught.value)


def test_export_declares_stress_only_when_the_model_gives_a_virial(tmp_path):
    """A model whose energy_and_forces returns no virial is exported with supports_stress False,
    and asking it for stress is refused by name (it used to be declared True for every model)."""
    from typing import Dict

    from torch import Tensor

    from mlmd.errors import InputError
    from mlmd.models.pair import MorsePotential
    from mlmd.potential import export

    class NoVirial(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = MorsePotential([29])
            self.species, self.cutoff, self.committee_size = [29], self.inner.cutoff, 1

        @torch.jit.export
        def energy_and_forces(self, edge_vectors: Tensor, species_index: Tensor, edge_index: Tensor,
                              compute_virial: bool, create_graph: bool) -> Dict[str, Tensor]:
            out = self.inner.energy_and_forces(edge_vectors, species_index, edge_index, False, create_graph)
            return {"atom_energy": out["atom_energy"], "forces": out["forces"]}

    plain = mlmd.load(export(NoVirial(), tmp_path / "no_virial.pt", {}))
    assert plain.metadata[keys.META_STRESS] is False
    assert mlmd.load(export(MorsePotential([29]), tmp_path / "morse.pt", {})).metadata[keys.META_STRESS] is True
    from ase.build import bulk
    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    assert np.isfinite(plain.compute_atoms(copper)["energy"])
    with pytest.raises(InputError, match="stress"):
        plain.compute_atoms(copper, stress=True)


def test_archive_without_metadata(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 1)), str(path))
    with pytest.raises(ModelFileError, match="without mlmd metadata"):
        mlmd.load(path)


def test_newer_contract_version_is_refused(tmp_path):
    from mlmd.potential import export

    path = tmp_path / "future.pt"
    export(make_model(), path, {keys.META_CONTRACT: "99.0"})
    with pytest.raises(ModelFileError, match="newer than this mlmd"):
        mlmd.load(path)


def test_unknown_element(potential, ethanol):
    ethanol.numbers[0] = 26
    with pytest.raises(InputError, match=r"Fe \(Z=26\).*not in this model's species"):
        potential.compute_atoms(ethanol)


def test_unknown_element_inside_torchscript(potential):
    """The module itself refuses unknown elements (hosts that bypass the Python wrapper)."""
    pos = torch.zeros((2, 3), dtype=torch.float64)
    pos[1, 0] = 1.0
    args = (pos, torch.tensor([1, 26]), torch.zeros((3, 3), dtype=torch.float64), torch.zeros(3, dtype=torch.bool),
            torch.tensor([[0, 1], [1, 0]]), torch.zeros((2, 3), dtype=torch.float64), False)
    with pytest.raises(Exception, match="not among the model's species"):
        potential.module(*args)


def test_nan_positions(potential, ethanol):
    ethanol.positions[3, 1] = np.nan
    with pytest.raises(InputError, match=r"positions: NaN or Inf at atom\(s\) \[3\]"):
        potential.compute_atoms(ethanol)


@pytest.mark.parametrize("kwargs, message", [
    ({"positions": np.zeros((4,))}, r"positions: expected shape \[N, 3\], got \[4\]"),
    ({"positions": np.zeros((4, 2))}, r"positions: expected shape \[N, 3\], got \[4, 2\]"),
    ({"numbers": np.ones(3, dtype=int)}, r"numbers: expected shape \[4\], got \[3\]"),
    ({"cell": np.eye(2)}, r"cell: expected shape \[3, 3\]"),
    ({"edge_index": np.zeros((3, 2), dtype=int)}, r"edge_index: expected shape \[2, E\]"),
    ({"edge_index": np.array([[0, 7], [1, 0]])}, r"edge_index: indices must be in 0..3"),
])
def test_wrong_shapes(potential, kwargs, message):
    args = {"positions": np.eye(4, 3) * 1.1, "numbers": np.array([1, 1, 6, 8])}
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        potential.compute(**args)


def test_zero_cell_with_pbc(potential, ethanol):
    ethanol.pbc = True
    with pytest.raises(InputError, match="cell: periodic"):
        potential.compute_atoms(ethanol)


def test_data_set_without_forces(tmp_path, ethanol):
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from mlmd.models.data import read_dataset

    ethanol.calc = SinglePointCalculator(ethanol, energy=-1.0)
    path = tmp_path / "energies_only.extxyz"
    ase.io.write(path, [ethanol, ethanol])
    with pytest.raises(DataError, match="frame 0 .* has no forces"):
        read_dataset(path)
    ethanol.calc = None
    ase.io.write(tmp_path / "bare.extxyz", ethanol)
    with pytest.raises(DataError, match="no energy label"):
        read_dataset(tmp_path / "bare.extxyz")


def test_cli_reports_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mlmd.cli", "train", str(tmp_path / "none.extxyz"),
                          "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "data: file" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_help_lists_everything_without_torch():
    """`mlmd --help` names every subcommand and loads neither torch nor numba; `--version` works;
    every `mlmd train` flag has a help line; `mlmd run --help` names the YAML keys."""
    import argparse

    from mlmd import __version__
    from mlmd.cli import build_parser

    code = ("import sys; from mlmd.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'torch' in sys.modules, 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LOADED False False" in out
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in commands:
        assert name in out, name
    assert {"label", "train", "run", "learn", "bench", "audit"} <= set(commands)
    version = subprocess.run([sys.executable, "-m", "mlmd.cli", "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.strip() == f"mlmd {__version__}"
    for action in commands["train"]._actions:
        assert action.help, action.option_strings or action.dest
    from dataclasses import fields
    from mlmd.md.run import RunConfig
    epilog = commands["run"].format_help()
    for f in fields(RunConfig):
        assert f"  {f.name}:" in epilog, f.name
