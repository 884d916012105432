"""The ``mlmd`` command: label, train, export, info, audit, import-mace, run, learn, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .errors import InputError, MLMDError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd_label(args) -> int:
    import ase.io

    from .models.data import sample_md

    try:
        atoms = ase.io.read(args.structure)
    except FileNotFoundError:
        raise MLMDError(f"structure: file {args.structure!r} does not exist") from None
    out = sample_md(atoms, args.oracle, args.out, frames=args.frames, temperature=args.temperature,
                    timestep=args.timestep, interval=args.interval, equilibration=args.equilibration,
                    friction=args.friction, seed=args.seed, relax=not args.no_relax)
    print(f"wrote {args.frames} labelled frames to {out}")
    return 0


def _cmd_train(args) -> int:
    from .models.train import TrainConfig, train

    config = TrainConfig.from_args(args)
    result = train(config)
    print(json.dumps(result["test_metrics_summary"], indent=1))
    return 0


def _cmd_export(args) -> int:
    from .models.train import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {path}")
    return 0


def _cmd_info(args) -> int:
    from .potential import load_module

    _, meta = load_module(args.model)
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from . import keys

    table = Table(title=f"mlmd model {args.model}", show_header=False)
    for key, value in meta.items():
        if key == keys.META_EXAMPLE and isinstance(value, dict):
            text = f"{len(value.get('numbers', []))} atoms, pbc {value.get('pbc')} (--json prints it)"
        else:
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        table.add_row(key, escape(text))
    Console().print(table)
    return 0


def _cmd_audit(args) -> int:
    from .testing import audit

    report = audit(args.model, dtype=args.dtype)
    return 0 if report["verdict"] == "pass" else 1


def _cmd_import_mace(args) -> int:
    from .plugins.mace import import_mace

    example = None
    if args.example:
        import ase.io

        example = ase.io.read(args.example)
    path = import_mace(args.models, args.out, dtype=args.dtype, example=example)
    print(f"wrote {path}: {len(args.models)} MACE model(s) as one mlmd committee file (check it: mlmd audit {path})")
    if args.calibrate:
        from .models.data import read_dataset
        from .uncertainty import calibrate_file

        calibration = calibrate_file(path, read_dataset(args.calibrate))
        if calibration:
            print(f"σ calibration factor {calibration['factor']:.3f} on {calibration['frames']} frames of "
                  f"{args.calibrate}")
    return 0


def _cmd_run(args) -> int:
    from .md.run import RunConfig, run

    overrides = {"steps": args.steps, "output": args.out, "threads": args.threads, "compiled": args.compiled}
    config = RunConfig.from_file(args.config, overrides)
    summary = run(config, restart=args.restart, progress=not args.no_progress,
                  allow_model_change=args.allow_model_change)
    return _print_run_summary(config, summary)


def _cmd_learn(args) -> int:
    from .active.learn import LearnConfig, learn

    overrides = {"steps": args.steps, "output": args.out, "mode": args.mode, "dask": args.dask}
    config = LearnConfig.from_file(args.config, overrides)
    summary = learn(config, restart=args.restart, progress=not args.no_progress)
    code = _print_run_summary(config, summary)
    print(f"  learning: {summary['labels_requested']} labels requested, {summary['labels']} in "
          f"{config.output}/active/labels.extxyz ({summary['label_failures']} oracle failures), "
          f"{summary['retrainings']} retrainings, {summary['rollbacks']} rollbacks; model in use: "
          f"{summary['model']}")
    return code


def _print_run_summary(config, summary) -> int:
    out = config.output
    lines = [f"{summary['steps']} steps ({summary['time_ps']:.3f} ps) of {summary['atoms']} atoms -> {out}/",
             f"  mean T {summary['mean_temperature_K']:.1f} K, conserved-energy std "
             f"{summary['conserved_fluctuation_eV']:.3g} eV"]
    if "drift_eV_per_atom_per_ps" in summary:
        lines.append(f"  conserved-energy drift {summary['drift_eV_per_atom_per_ps']:.3g} eV/atom/ps")
    if summary.get("ns_per_day"):
        form = f"{summary.get('model_form', 'TorchScript')} model"
        if "compile_s" in summary:
            form += f", compiled and checked at start in {summary['compile_s']:.0f} s"
        lines.append(f"  {summary['ns_per_day']:.3g} ns/day ({form}), {summary['neighbor_builds']} "
                     "neighbour-list builds")
    if "max_uncertainty_eV_per_A" in summary:
        lines.append(f"  max committee force σ {summary['max_uncertainty_eV_per_A']:.3g} eV/Å")
    if summary.get("plot"):
        lines.append(f"  plot: {summary['plot']}")
    if "observables_csv" in summary:
        lines.append(f"  observables over {summary['observables_frames']} frames, committee intervals by "
                     f"reweighting (min effective sample {summary['observables_min_ess_percent']:.0f} %"
                     f"{'' if summary['observables_reliable'] else ': NOT reliable, see above'}): "
                     f"{summary['observables_csv']}" + (f", {summary['observables_plot']}"
                                                        if summary.get("observables_plot") else ""))
    elif "observables" in summary:
        lines.append(f"  observables {summary['observables']}")
    if summary.get("interrupted"):
        lines.append("  interrupted: checkpoint written; continue with --restart")
    print("\n".join(lines))
    return 130 if summary.get("interrupted") else 0


def _cmd_bench(args) -> int:
    from . import bench

    if args.name == "all":
        from .bench_all import bench_all
        results = bench_all(out=args.out or os.path.join("runs", "bench_all"), report=args.report,
                            only=args.only, skip=args.skip or ())
        return 0 if all(r["returncode"] == 0 for r in results) else 1
    if args.threads and args.name != "committee":
        torch_threads(args.threads)
    if args.name == "committee":
        bench.bench_committee(args.model, sizes=args.members, repeats=args.repeats, threads=args.threads)
    elif args.name == "neighbors":
        from .neighbors.bench import bench_neighbors, format_neighbor_table
        rows = bench_neighbors(sizes=tuple(args.sizes) if args.sizes else (256, 2048, 6912, 16384))
        print(format_neighbor_table(rows))
        bench.bench_skin()
    elif args.name == "md":
        bench.bench_md(ethanol_model=args.model)
    elif args.name == "openmm":
        bench.bench_openmm()   # the shipped ethanol and alanine dipeptide systems
    elif args.name == "models":
        models_budget = _load_benchmark("models_budget")
        return models_budget.main(["--budget-minutes", f"{args.budget_minutes:g}",
                                   "--out", args.out or os.path.join("runs", "bench_models"),
                                   "--systems", *(args.systems or list(models_budget.SYSTEMS))])
    elif args.name == "latency":
        latency = _load_benchmark("latency")
        latency.main(["--threads", str(args.threads or 1)] + (["--sizes", *map(str, args.sizes)] if args.sizes else []))
    elif args.name == "warmup":
        _load_benchmark("executor_warmup").main([])
    elif args.name == "uncertainty":
        _load_benchmark("uncertainty_calibration").main([])
    elif args.name == "observables":
        _load_benchmark("observables_coverage").main(["--out", args.out or os.path.join("runs", "bench_observables")])
    elif args.name == "active":
        from .active.bench import bench_active
        bench_active(out=args.out or os.path.join("runs", "bench_active"), steps=args.steps or 6000,
                     dask=args.dask, hosts=args.hosts, pool=args.pool, select=args.select)
    elif args.name == "stability":
        from .active.stability import bench_stability
        bench_stability(out=args.out or os.path.join("runs", "bench_stability"), seeds=args.seeds,
                        picoseconds=args.ps, n_train=args.initial_frames, labels_per_ns=args.labels_per_ns)
    return 0


def _load_benchmark(name: str):
    """A script of benchmarks/ (kept outside the package, as vesin and torch-sim keep theirs)."""
    import importlib.util
    path = os.path.join(_ROOT, "benchmarks", f"{name}.py")
    if not os.path.exists(path):
        raise InputError(f"bench: {path} is missing; `mlmd bench` runs from a checkout of the repository")
    spec = importlib.util.spec_from_file_location(f"mlmd_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _run_keys() -> str:
    """The YAML keys of `mlmd run`, from RunConfig itself (with their defaults)."""
    import dataclasses

    from .md.run import RunConfig

    lines = ["YAML keys (required first; the others with their defaults):"]
    for f in dataclasses.fields(RunConfig):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            lines.append(f"  {f.name}: (required)")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name}: {default!r}" + ("" if default is not None else "  (see mlmd.md.run)"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mlmd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mlmd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("label", help="sample geometries by MD with a reference method and label them")
    p.add_argument("structure", help="start structure (any format ASE reads)")
    p.add_argument("--oracle", default="gfn2-xtb", help="gfn2-xtb | gfn1-xtb | emt")
    p.add_argument("--out", required=True, help="extxyz file to create (frames are appended as made)")
    p.add_argument("--frames", type=int, default=650)
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--interval", type=int, default=20, help="MD steps between saved frames")
    p.add_argument("--equilibration", type=int, default=1000, help="MD steps before the first frame")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-relax", action="store_true", help="skip the BFGS relaxation of the start structure")
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser("train", help="train a model or a committee on an extxyz data set")
    from .models.config import add_train_arguments
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a training checkpoint to a TorchScript model file")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, choices=["float32", "float64"],
                   help="dtype of the exported module (default: the training run's export dtype)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("info", help="print a model file's metadata")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("audit", help="run the contract checks of mlmd.testing on a model file")
    p.add_argument("model")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                   help="precision for the finite-difference checks (the file is cast)")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("import-mace", help="bring MACE models (mace_run_train's .model files) into one mlmd file; "
                       "UNPICKLES them: import only files you trust",
                       description="MACE's .model format is a Python pickle, and unpickling a file runs code it "
                                   "refers to. import-mace first refuses files that are not torch.save archives of "
                                   "a MACE model or that refer to anything outside mace/e3nn/torch/numpy, without "
                                   "unpickling them; that screens out other files, it does not make a hostile "
                                   "file safe (MACE's own parts carry code that runs on load). Import only .model "
                                   "files you or someone you trust trained. The mlmd file written is TorchScript "
                                   "and loads without unpickling.")
    p.add_argument("models", nargs="+", help="one .model file per committee member (same elements and r_max)")
    p.add_argument("--out", required=True, help="mlmd model file to write")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--example", default=None,
                   help="a structure file (any ASE format) stored in the file for `mlmd audit`")
    p.add_argument("--calibrate", default=None, metavar="DATA",
                   help="labelled frames held out from training (extxyz): set the committee's σ calibration "
                        "factor on them")
    p.set_defaults(func=_cmd_import_mace)

    p = sub.add_parser("run", help="production MD in the internal engine from a YAML config",
                       epilog=_run_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML file, or a systems/<name> folder holding run.yaml")
    p.add_argument("--steps", type=int, default=None, help="total steps (overrides the config)")
    p.add_argument("--out", default=None, help="output folder (overrides the config's output)")
    p.add_argument("--restart", action="store_true", help="continue from OUT/checkpoint.npz")
    p.add_argument("--allow-model-change", action="store_true",
                   help="with --restart: continue with the config's model file although the checkpoint was "
                        "written with another one (refused otherwise: the energy jumps)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (overrides the config; default one per 256 atoms)")
    p.add_argument("--compiled", action="store_true", default=None,
                   help="run the compiled form of the model (sets the config's compiled: true; compiles at start)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("learn", help="MD with on-the-fly learning: label uncertain frames, retrain, swap")
    p.add_argument("config", help="YAML file, or a folder holding learn.yaml (see mlmd.active.learn)")
    p.add_argument("--steps", type=int, default=None, help="total steps (overrides the config)")
    p.add_argument("--out", default=None, help="output folder (overrides the config's output)")
    p.add_argument("--mode", default=None, choices=["sync", "async"], help="overrides the config's mode")
    p.add_argument("--dask", default=None, help="none | local | tcp://host:port (overrides the config)")
    p.add_argument("--restart", action="store_true", help="continue after a kill, from OUT/checkpoint.npz")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_learn)

    p = sub.add_parser("bench", help="side-by-side benchmarks (ratios printed)")
    p.add_argument("name", choices=["all", "committee", "neighbors", "md", "openmm", "models", "active", "stability",
                                    "latency", "warmup", "observables", "uncertainty"],
                   help="all: every benchmark below, one after the other, written into BENCHMARKS.md; "
                        "committee: M members vs one; neighbors: our list vs vesin/matscipy/ASE and "
                        "the Verlet skin; md: engine overhead vs ASE and OpenMM; openmm: TorchForce "
                        "and PythonForce paths vs the bare model call; models: trains the built-in and a MACE committee "
                        "on the same frames for the same wall time (ethanol, aspirin, copper; force MAE, rotation "
                        "error, MD ms/step); active: labels the uncertainty loop needs "
                        "vs random frames (ethanol, GFN2-xTB, 600 K); stability: time to a broken bond at 500 K with the "
                        "loop off vs on; latency: per-call ms of TorchScript vs the compiled form at 9 to 10,000 atoms "
                        "with GFLOP/s vs the measured peak; warmup: MD ms/step on a fresh module vs one that "
                        "evaluated 100 frames of other sizes; observables: coverage of the committee's 90 %% "
                        "intervals for ethanol's bond, angle, dihedral and pair-distance distributions and mean "
                        "energy against a GFN2-xTB run (reweighted and per-member runs); uncertainty: how the shipped "
                        "ethanol and aspirin committees' σ ranks and sizes force errors on fresh GFN2-xTB frames at 300 "
                        "and 700 K (Spearman, miscalibration area, NLL, σ ratio vs error ratio)")
    p.add_argument("--model", default=os.path.join(_ROOT, "systems", "ethanol", "ethanol_committee.pt"),
                   help="committee, md: model file whose hyper-parameters, dtype and example frame are "
                        "used (openmm always runs the shipped ethanol and alanine dipeptide systems)")
    p.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="neighbors: atom counts (256 2048 6912 16384)")
    p.add_argument("--out", default=None, help="active, stability, all: folder for the results "
                   "(runs/bench_active, runs/bench_stability, runs/bench_all)")
    p.add_argument("--seeds", type=int, default=5, help="stability: MD runs per arm (5)")
    p.add_argument("--ps", type=float, default=20.0, help="stability: picoseconds per run (20)")
    p.add_argument("--initial-frames", type=int, default=5,
                   help="stability: 300 K frames the initial committee is trained on (5)")
    p.add_argument("--labels-per-ns", type=float, default=4000.0,
                   help="stability: the loop's label budget per ns of MD (4000)")
    p.add_argument("--steps", type=int, default=None, help="active: MD steps of the loop arm (6000)")
    p.add_argument("--hosts", nargs="+", default=["engine"], choices=["engine", "openmm", "ase"],
                   help="active: hosts the loop arm runs in (engine; the random arm uses the engine's frames)")
    p.add_argument("--pool", type=int, default=1, help="active: label the most uncertain 1/POOL of the candidates (1)")
    p.add_argument("--select", default="sigma", choices=["sigma", "diverse"],
                   help="active: with --pool, label the most uncertain (sigma) or far-apart (diverse) candidates")
    p.add_argument("--dask", default=None, help="active: 'local' or a scheduler address to fan out labels/training")
    p.add_argument("--budget-minutes", type=float, default=6.0,
                   help="models: training wall time of each side per system (6)")
    p.add_argument("--systems", nargs="+", default=None, help="models: ethanol aspirin copper (all three)")
    p.add_argument("--only", nargs="+", default=None, help="all: run only these benchmarks")
    p.add_argument("--skip", nargs="+", default=None, help="all: leave these benchmarks out")
    p.add_argument("--report", default=os.path.join(_ROOT, "BENCHMARKS.md"),
                   help="all: markdown file whose generated block is rewritten (BENCHMARKS.md)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MLMDError as exc:
        print(f"mlmd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
