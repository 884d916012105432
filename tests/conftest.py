import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETHANOL_DIR = os.path.join(ROOT, "systems", "ethanol")
SHIPPED_MODEL = os.path.join(ETHANOL_DIR, "ethanol_committee.pt")
ETHANOL_DATA = os.path.join(ETHANOL_DIR, "data.extxyz")

SMALL_HP = {"channels": 16, "layers": 2, "degree": 2, "radial_width": 16, "cutoff": 4.0}


def make_model(committee=1, seed=0, hyperparameters=None, species=(1, 6, 8)):
    from mlmd.models.ponita import PonitaPotential

    hp = dict(SMALL_HP)
    hp.update(hyperparameters or {})
    return PonitaPotential(list(species), committee_size=committee, seed=seed, hyperparameters=hp,
                           energy_shift=[-10.0, -40.0, -60.0][:len(species)], energy_scale=0.5,
                           avg_num_neighbors=6.0)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """A small committee of 2 (untrained weights), exported in float64."""
    from mlmd.potential import export

    path = tmp_path_factory.mktemp("models") / "small_committee.pt"
    export(make_model(committee=2), path, {"model_family": "ponita"}, dtype="float64")
    return str(path)


@pytest.fixture(scope="session")
def potential(model_file):
    import mlmd

    return mlmd.load(model_file)


@pytest.fixture()
def ethanol():
    import ase.io

    return ase.io.read(os.path.join(ETHANOL_DIR, "ethanol.xyz"))


@pytest.fixture()
def periodic_triclinic():
    """8 atoms of H/C/O in a skewed periodic cell smaller than twice the cutoff."""
    from ase import Atoms

    rng = np.random.default_rng(3)
    cell = np.array([[5.2, 0.0, 0.0], [1.3, 4.9, 0.0], [0.7, -0.9, 5.4]])
    numbers = [6, 6, 8, 1, 1, 1, 1, 1]
    # a jittered lattice keeps atoms apart
    frac = np.array([[i / 2, j / 2, k / 2] for i in range(2) for j in range(2) for k in range(2)])
    frac += rng.uniform(-0.06, 0.06, size=frac.shape)
    return Atoms(numbers=numbers, scaled_positions=frac, cell=cell, pbc=True)
