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
