"""`mlmd audit` passes a sound model and flags deliberately broken ones: forces that are not the
gradient of the energy, and a model that ignores the periodic images (the pair shifts)."""
import os
from typing import Dict

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import mlmd
from mlmd import keys
from mlmd.cli import main as mlmd_main
from mlmd.models.forces import edge_forces
from mlmd.models.pair import MorsePotential
from mlmd.potential import export
from mlmd.testing import audit, check_rotation_invariance, example_atoms


class ScaledForcesMorse(MorsePotential):
    """Broken: forces 1.2 x the negative gradient of the energy it reports."""

    @torch.jit.export
    def energy_and_forces(self, edge_vectors: Tensor, species_index: Tensor, edge_index: Tensor,
                          compute_virial: bool, create_graph: bool) -> Dict[str, Tensor]:
        vectors = edge_vectors.detach().unsqueeze(0).repeat(self.committee_size, 1, 1).requires_grad_(True)
        out = edge_forces(self.forward(vectors, species_index, edge_index), vectors, edge_index,
                          species_index.shape[0], compute_virial, create_graph)
        out["forces"] = 1.2 * out["forces"]
        return out


class IgnoresShifts(nn.Module):
    """Broken: a model file whose module drops the pair shifts, so it sees every pair across the
    cell boundary at the wrong distance (what a model that works on raw positions does)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, positions: Tensor, numbers: Tensor, cell: Tensor, pbc: Tensor, edge_index: Tensor,
                shifts: Tensor, compute_stress: bool = False) -> Dict[str, Tensor]:
        return self.inner(positions, numbers, cell, pbc, edge_index, torch.zeros_like(shifts), compute_stress)


@pytest.fixture(scope="module")
def copper_frame():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=3)
    return atoms


def metadata(atoms) -> Dict:
    return {"model_family": "morse", keys.META_EXAMPLE: {
        "numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
        "cell": np.asarray(atoms.cell).tolist(), "pbc": atoms.pbc.tolist()}}


def test_audit_passes_a_sound_model_and_flags_broken_ones(tmp_path, copper_frame, capsys):
    settings = dict(species=[29], cutoff=5.0, committee_size=2, spread=0.05)
    sound = export(MorsePotential(**settings), tmp_path / "sound.pt", metadata(copper_frame))
    bad_gradient = export(ScaledForcesMorse(**settings), tmp_path / "bad_gradient.pt", metadata(copper_frame))

    extra = {keys.METADATA_FILE: ""}                 # the sound file's metadata, kept as it is
    inner = torch.jit.load(sound, _extra_files=extra)
    no_shifts = str(tmp_path / "no_shifts.pt")
    torch.jit.save(torch.jit.script(IgnoresShifts(inner)), no_shifts, _extra_files=extra)

    def failed(report):
        return {name for name, status, _ in report["checks"] if status == "FAIL"}

    assert audit(sound, print_report=False)["verdict"] == "pass"

    report = audit(bad_gradient, print_report=False)
    assert report["verdict"] == "fail"
    assert any(name.startswith("forces = -dE/dx") for name in failed(report))
    assert any(name.startswith("NVE") for name in failed(report))

    report = audit(no_shifts, print_report=False)
    assert report["verdict"] == "fail"
    assert any(name.startswith("periodic images") for name in failed(report))

    # the command line: exit status 1 and the verdict printed
    assert mlmd_main(["audit", str(sound)]) == 0
    assert mlmd_main(["audit", no_shifts]) == 1
    assert "verdict: FAIL" in capsys.readouterr().out


GRID_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "grid_copper_committee.pt")


def test_audit_fails_the_grid_based_model_on_rotation_and_reports_the_virial():
    """tests/data/grid_copper_committee.pt is the copper committee mlmd 0.1 shipped, whose S^2 grid
    was fixed in the lab frame: the audit fails it on rotation (0.03 eV/Å against 1e-4 allowed) and
    reports the antisymmetric virial it gives a crystal (0.4 eV)."""
    report = audit(GRID_FILE, n_rotations=10, print_report=False)
    rows = {name.split(",")[0]: (status, text) for name, status, text in report["checks"]}
    print("grid-based copper, rotation:", rows["rotation"])
    assert report["verdict"] == "fail"
    assert rows["rotation"][0] == "FAIL" and "not invariant" in rows["rotation"][1]
    errors = check_rotation_invariance(mlmd.load(GRID_FILE).with_dtype("float64"),
                                       example_atoms(mlmd.load(GRID_FILE)), n_rotations=10)
    assert errors["virial_antisymmetric"] > 0.01
    # everything else of the old file is sound: it is the rotation alone that fails
    assert {name for name, (status, _) in rows.items() if status == "FAIL"} == {"rotation"}
