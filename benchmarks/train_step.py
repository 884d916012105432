"""Wall time of one `mlmd train` optimizer step of the built-in committee (eager model, forces
by autograd with create_graph, AdamW), with an optional torch.profiler table of the top ops.

    .venv/bin/python benchmarks/train_step.py systems/ethanol/data.extxyz [--profile]

Batches of 10 frames from the file's first 50, committee of 4, default hyper-parameters;
4 warm-up steps, then 12 timed ones.  Run it alone (two torch jobs on two cores slow each other).
"""
import argparse
import time

import torch

from mlmd.models.data import read_dataset
from mlmd.models.ponita import DEFAULT_HYPERPARAMETERS
from mlmd.models.train import (Graphs, TrainConfig, build_model, dataset_statistics, fit_reference_energies,
                               optimizer_step)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--committee", type=int, default=4)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    frames = read_dataset(args.data)[:50]
    species = sorted({int(z) for a in frames for z in a.numbers})
    hp = dict(DEFAULT_HYPERPARAMETERS)
    graphs = Graphs(frames, species, hp["cutoff"], torch.float32)
    stats = dataset_statistics(frames, graphs, list(range(len(frames))))
    model = build_model({"species": species, "committee": args.committee, "seed": 0, "hyperparameters": hp,
                         "energy_shift": fit_reference_energies(frames, species).tolist(),
                         "energy_scale": stats["force_rms"], "avg_num_neighbors": stats["avg_num_neighbors"]}).float()
    config = TrainConfig(data=args.data, out="unused")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [graphs.batch(list(range(i, i + 10))) for i in range(0, 40, 10)]

    def steps():
        for batch in batches:
            optimizer_step(model, batch, stats["force_rms"], config, None, optimizer, scheduler)

    steps()
    start = time.perf_counter()
    for _ in range(3):
        steps()
    print(f"{1e3 * (time.perf_counter() - start) / (3 * len(batches)):.1f} ms per step "
          f"(10 frames of {len(frames[0])} atoms, committee {args.committee}, {torch.get_num_threads()} threads)")
    if args.profile:
        from torch.profiler import profile
        with profile() as prof:
            steps()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
