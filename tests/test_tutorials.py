"""Every tutorial runs, in a fast mode (fewer steps)."""
import importlib.util
import os

import numpy as np
import pytest

from conftest import ROOT


def load_tutorial(name):
    path = os.path.join(ROOT, "tutorials", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlmm_alanine_dipeptide(tmp_path):
    """ML/MM through openmm-ml: the peptide stays intact (bonds within 0.5 Å) and energies are finite."""
    pytest.importorskip("openmmml")
    tutorial = load_tutorial("mlmm_alanine_dipeptide.py")
    result = tutorial.main(["--steps", "100", "--out", str(tmp_path)])
    assert np.isfinite(result["energy"]) and result["energy"] < 0
    assert result["max_bond_change"] < 0.5
    assert np.isfinite(result["uncertainty"]) and result["uncertainty"] > 0
    for name in ("state.csv", "uncertainty.csv", "trajectory.dcd"):
        assert (tmp_path / name).stat().st_size > 0


def test_ase_relaxation(tmp_path):
    """BFGS and FIRE relax ethanol; FrechetCellFilter + BFGS give copper's lattice constant within
    0.5 % of EMT's own; ASE's Langevin leaves the committee's σ in calc.results every report."""
    tutorial = load_tutorial("ase_relaxation.py")
    result = tutorial.main(["--steps", "60", "--out", str(tmp_path)])
    assert result["ethanol_bfgs_fmax"] < 0.01 and result["ethanol_fire_fmax"] < 0.01
    assert abs(result["ethanol_bfgs_energy"] - result["ethanol_fire_energy"]) < 0.01
    assert abs(result["a_emt"] - 3.5898) < 1e-3
    assert abs(result["a_relative_error"]) < 0.005
    assert len(result["sigmas"]) == 4 and np.all(np.isfinite(result["sigmas"]))
    assert result["sigmas"][1:].min() > 0     # step 0 is the perfect lattice: zero forces, σ ~ 0
    assert (tmp_path / "uncertainty.csv").stat().st_size > 0


def test_openmm_switch_to_mlmd(tmp_path):
    """The same OpenMM script with amber14 and with the mlmd committee: both keep the molecule
    intact, and the energy OpenMM reports for the mlmd System is the model's own at those positions."""
    pytest.importorskip("openmmml")
    tutorial = load_tutorial("openmm_switch_to_mlmd.py")
    result = tutorial.main(["--steps", "200", "--out", str(tmp_path)])
    for name in ("amber14", "mlmd"):
        assert result[name]["max_bond_change_A"] < 0.5
        assert (tmp_path / name / "trajectory.dcd").stat().st_size > 0
    assert abs(result["mlmd"]["energy_kj_mol"] - result["mlmd_direct_kj_mol"]) < 0.1
    assert result["mlmd"]["energy_kj_mol"] < -5e4          # a GFN2-xTB total energy, not a force-field one
    assert abs(result["amber14"]["energy_kj_mol"]) < 1e3
    assert np.all(np.isfinite(result["sigmas"])) and result["sigmas"].min() > 0


def test_production_md(tmp_path):
    """`mlmd run` then `mlmd run --restart` give one contiguous log; the committee's Cu–Cu first
    shell (mean distance, 12 neighbours) matches EMT's own run in ASE at the same temperature."""
    tutorial = load_tutorial("production_md.py")
    result = tutorial.main(["--steps", "200", "--out", str(tmp_path)])
    steps = result["steps"]
    assert steps[-1] == 200 and np.all(np.diff(steps) == 10)         # log_interval 10, no gap, no replay
    assert result["frames"] == 11
    assert abs(result["shell_mlmd"][0] - result["shell_emt"][0]) < 0.01
    assert abs(result["shell_mlmd"][1] - 12.0) < 0.3 and abs(result["shell_emt"][1] - 12.0) < 0.3
    assert 450 < result["mean_temperature"] < 750
    assert (tmp_path / "rdf.png").stat().st_size > 0


def test_bring_your_own_model(tmp_path):
    """A model written from scratch in the tutorial passes the audit, learns EMT copper and gives
    the same energy and forces in the engine, ASE and OpenMM."""
    pytest.importorskip("openmm")
    tutorial = load_tutorial("bring_your_own_model.py")
    result = tutorial.main(["--steps", "400", "--out", str(tmp_path)])
    assert result["verdict"] == "pass"
    assert result["force_mae"] < 0.15 * result["force_std"]
    for host, (energy_gap, force_gap) in result["host_gap"].items():
        assert energy_gap < 1e-9 and force_gap < 1e-9, host


@pytest.mark.slow  # ~4 min; the loop itself (labels, swaps, kill/resume) is in test_active's default tests
def test_on_the_fly_learning(tmp_path):
    """`mlmd learn` at 2000 K labels uncertain copper frames with EMT and swaps fine-tuned
    generations in; the final committee fits the labels better than the shipped one did (force
    error and σ both lower on them) and is no worse on the frames the run visited."""
    tutorial = load_tutorial("on_the_fly_learning.py")
    result = tutorial.main(["--steps", "200", "--out", str(tmp_path), "--no-progress"])
    assert result["labels"] >= 4 and result["retrainings"] >= 1
    assert os.path.basename(result["model"]).startswith("generation_")
    labelled, visited = result["labelled"], result["visited"]
    assert labelled["frames"] == result["labels"]
    assert labelled["mae_after"] < 0.9 * labelled["mae_before"]
    assert labelled["sigma_after"] < labelled["sigma_before"]
    assert visited["mae_after"] < 1.05 * visited["mae_before"]
    log = (tmp_path / "run" / "learn.csv").read_text()
    assert "swap" in log and "generation_001.pt" in log
