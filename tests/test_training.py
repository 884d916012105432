"""Training, committee, checkpoints and export on real GFN2-xTB ethanol data."""
import json
import os

import numpy as np
import pytest
import torch

import mlmd
from mlmd import keys, testing
from mlmd.models.train import TrainConfig, train

from conftest import ETHANOL_DATA, SHIPPED_MODEL

TINY = {"channels": 8, "layers": 1, "degree": 2, "correlation": 2, "radial_width": 8, "cutoff": 4.0}


def _config(out, **kw):
    values = dict(data=ETHANOL_DATA, out=str(out), committee=2, epochs=2, batch_size=10, n_train=40,
                  n_val=10, n_test=10, progress=False, hyperparameters=TINY, bootstrap=True,
                  warmup_epochs=0, lr=1e-2)
    values.update(kw)
    return TrainConfig(**values)


def test_train_committee_resume_and_export(tmp_path):
    first = train(_config(tmp_path, epochs=1))
    assert len(first["history"]) == 1
    resumed = train(_config(tmp_path, epochs=3, resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for name in ("checkpoint.pt", "model.pt", "metrics.json", "parity.png"):
        assert os.path.getsize(tmp_path / name) > 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3
    summary = json.load(open(tmp_path / "metrics.json"))["summary"]
    assert summary["committee"] == 2 and summary["n_test"] == 10
    # training lowers the loss from its first epoch
    assert resumed["history"][-1]["train_loss"] < resumed["history"][0]["train_loss"]
    pot = mlmd.load(tmp_path / "model.pt")
    assert pot.committee_size == 2
    assert pot.metadata[keys.META_FINGERPRINT] and len(pot.metadata[keys.META_FINGERPRINT]) == 64
    atoms = testing.example_atoms(pot)
    testing.check_committee_consistency(pot, atoms)
    # trained weights keep the exact invariance (float64; issue 17's bound)
    testing.check_rotation_invariance(pot.with_dtype("float64"), atoms, 20,
                                      {"forces": 1e-5, "energy_per_atom": 1e-6})
    # σ is calibrated on the validation split: the file's factor is the one fitted there
    from mlmd.models.data import read_dataset
    from mlmd.uncertainty import calibrate
    split = json.load(open(tmp_path / "metrics.json"))["split"]
    frames = read_dataset(ETHANOL_DATA)
    factor = calibrate(pot, [frames[i] for i in split["val"]]).factor
    assert factor != 1.0
    assert pot.metadata[keys.META_CALIBRATION] == pytest.approx(factor, rel=1e-6)
    assert summary["calibration"]["factor"] == pytest.approx(factor, rel=1e-6)


def test_resume_equals_uninterrupted(tmp_path):
    """Stopping after 1 epoch and resuming gives the same weights as 2 epochs in one go."""
    train(_config(tmp_path / "a", epochs=2, committee=1, bootstrap=False))
    # a time limit of ~0 stops the run after its first epoch, like a kill after a checkpoint
    stopped = train(_config(tmp_path / "b", epochs=2, committee=1, bootstrap=False, max_minutes=1e-9))
    assert stopped["test_metrics_summary"]["stopped_by"] == "time limit"
    train(_config(tmp_path / "b", epochs=2, committee=1, bootstrap=False, resume=True))
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["ema"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["ema"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_budget_runs_the_schedule_over_wall_time(tmp_path):
    """--budget-minutes: training stops at the budget, not at `epochs`, with the cosine at its floor."""
    budget = 0.15
    # warmup_epochs far beyond what the budget holds: the warm-up must still end at 5 % of it
    result = train(_config(tmp_path, committee=1, bootstrap=False, epochs=10 ** 6, budget_minutes=budget,
                           warmup_epochs=1000))
    summary = result["test_metrics_summary"]
    lrs = [h["lr"] for h in result["history"]]
    print(f"budget {60 * budget:.0f} s: {summary['epochs']} epochs in {summary['train_wall_s']:.1f} s, "
          f"lr {max(lrs):.2e} -> {lrs[-1]:.2e}")
    assert summary["stopped_by"] == "budget"
    assert 60 * budget <= summary["train_wall_s"] < 60 * budget + 20
    assert lrs[-1] <= 0.011 * max(lrs) + 1e-12
    assert lrs[len(lrs) // 2] > 0.2 * max(lrs)
    early = [h["lr"] for h in result["history"] if 0.1 * 60 * budget <= h["elapsed_s"] <= 0.3 * 60 * budget]
    assert early and min(early) > 0.7 * 1e-2, "the warm-up did not end at 5 % of the budget"


def test_bad_training_options(tmp_path):
    from mlmd.errors import InputError

    with pytest.raises(InputError, match="n_train \\+ n_val \\+ n_test = 2000"):
        train(_config(tmp_path, n_train=1800, n_val=100, n_test=100))
    with pytest.raises(InputError, match="resume: no checkpoint"):
        train(_config(tmp_path / "fresh", resume=True))


@pytest.mark.skipif(not os.path.exists(SHIPPED_MODEL), reason="shipped model not built yet")
def test_shipped_ethanol_committee_accuracy_and_contract():
    """The committed model: held-out GFN2-xTB force MAE below 15% of the data's force std."""
    from mlmd.models.data import read_dataset

    pot = mlmd.load(SHIPPED_MODEL)
    info = json.load(open(os.path.join(os.path.dirname(SHIPPED_MODEL), "metrics.json")))
    frames = read_dataset(ETHANOL_DATA)
    test_frames = [frames[i] for i in info["split"]["test"]]
    errors = []
    for atoms in test_frames:
        out = pot.compute_atoms(atoms)
        errors.append(np.abs(out["forces"] - atoms.get_forces()))
    mae = float(np.mean(errors))
    all_forces = np.concatenate([frames[i].get_forces().ravel() for i in info["split"]["train"]])
    std = float(np.std(all_forces))
    print(f"shipped committee: test force MAE {mae:.4f} eV/Å, data force std {std:.3f} eV/Å "
          f"({100 * mae / std:.1f}%)")
    assert mae < 0.15 * std
    pot64 = pot.with_dtype("float64")
    atoms = test_frames[0]
    assert testing.check_forces_finite_difference(pot64, atoms, rtol=1e-6) < 1e-6
    rot = testing.check_rotation_invariance(pot64, atoms, 100, {"forces": 1e-5, "energy_per_atom": 1e-6})
    print(f"shipped committee: max |ΔE| {rot['energy_max']:.2e} eV, max |ΔF| {rot['forces_max']:.2e} eV/Å "
          f"over 100 rotations, net torque {rot['torque']:.1e} eV")
    testing.check_committee_consistency(pot, atoms)
    # the σ calibration fitted on the validation frames carries over to the held-out test frames
    from mlmd.uncertainty import calibrate
    test_factor = calibrate(pot, test_frames).factor
    stored = pot.metadata[keys.META_CALIBRATION]
    print(f"shipped committee: calibration factor {stored:.3f} (validation), {test_factor:.3f} (test)")
    assert 0.75 < test_factor / stored < 1.33


def test_stress_labels_become_frame_virials_and_energy_shift_refit():
    """Periodic frames labelled with stress: the training virial of each frame in a batch equals
    the exported model's virial of that frame alone and -σV of its label; a constant shift of
    E0 is recovered by the closed-form refit."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from mlmd.models.data import label_frame
    from mlmd.models.train import Graphs, predict, refit_energy_shift
    from conftest import make_model

    frames = []
    for strain, seed in ((0.02, 1), (-0.03, 2)):
        atoms = bulk("Cu", "fcc", a=3.59 * (1 + strain), cubic=True).repeat((2, 1, 1))
        atoms.rattle(0.05, seed=seed)
        frames.append(label_frame(atoms, EMT()))
    assert keys.DATA_STRESS in frames[0].calc.results
    model = make_model(committee=2, species=(29,)).double()
    graphs = Graphs(frames, [29], model.cutoff, torch.float64)
    assert graphs.has_virials
    batch = graphs.batch([0, 1])
    for g, atoms in enumerate(frames):
        stress = frames[g].calc.results[keys.DATA_STRESS]
        assert batch["virial"][g, 0, 0] == pytest.approx(-stress[0] * atoms.get_volume(), rel=1e-12)
    _, _, virials = predict(model, batch, False, compute_virial=True)
    for g in range(2):
        alone = predict(model, graphs.batch([g]), False, compute_virial=True)[2]
        torch.testing.assert_close(virials[:, g], alone[:, 0], rtol=1e-10, atol=1e-10)

    refit_energy_shift(model, graphs, [0, 1])
    residual = batch["energy"] - predict(model, batch, False)[0].detach().mean(0)
    assert float((residual * batch["n_atoms"]).sum()) == pytest.approx(0.0, abs=1e-9)   # least squares
    model.energy_shift.sub_(0.25)
    assert refit_energy_shift(model, graphs, [0, 1])[0] == pytest.approx(0.25, abs=1e-9)


def test_weight_average_forgets_the_random_start(tmp_path):
    """After 4 optimizer steps the weight EMA (what validation, early stopping and export use)
    is an average of trained weights, not of the random start: with a fixed decay of 0.99 it
    would still be 0.99^4 = 96 % the initial weights (a short copper budget exported 0.118 eV/Å)."""
    from mlmd.models.train import build_model

    train(_config(tmp_path, epochs=1, n_train=40, batch_size=10, committee=1, bootstrap=False, ema_decay=0.99))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    initial = build_model(state["model_init"]).state_dict()
    moved_raw = sum(float((state["model"][k] - initial[k]).norm()) for k in state["ema"])
    moved_ema = sum(float((state["ema"][k] - initial[k]).norm()) for k in state["ema"])
    print(f"distance from the initial weights: raw {moved_raw:.3f}, EMA {moved_ema:.3f}")
    assert moved_ema > 0.5 * moved_raw
