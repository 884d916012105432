"""``mlmd bench all``: every side-by-side benchmark in one command, written into BENCHMARKS.md.

Each benchmark runs as its own ``mlmd bench NAME`` process, one after the other (two torch
processes on one small machine slow each other several-fold, so nothing runs beside them).
Its output is kept in ``OUT/NAME.log``, its plots are copied to ``benchmarks/figures/``, and
the block between the markers below in BENCHMARKS.md holds the latest run of each: the exact
command, when it ran and how long it took, the tail of its printed tables and its plots.  A
run of some benchmarks (``--only``) replaces their parts and keeps the others'. The
hand-written sections around the block (the analysis of earlier runs) are kept.
"""
from __future__ import annotations

import datetime
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from .errors import InputError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN = "<!-- mlmd bench all: begin (generated; edit outside this block) -->"
END = "<!-- mlmd bench all: end -->"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROGRESS = re.compile(r"\d+%\|")          # a tqdm bar: "loop in engine:  92%|████ | 553/600 [...]"
_GLOG = re.compile(r"^[WIE]\d{4} \d\d:\d\d:\d\d")   # torch's C++/compiler log lines: "W1207 23:31:02.222000 ..."


def sections(out: str) -> List[Dict]:
    """The benchmarks in the order they run: name, title, arguments of ``mlmd bench``, plot folder."""
    return [
        {"name": "neighbors", "title": "Neighbour lists vs vesin, matscipy and ASE; Verlet skin in MD",
         "args": ["neighbors"]},
        {"name": "md", "title": "MD engine vs ASE and OpenMM (driver overhead per step)", "args": ["md"]},
        {"name": "openmm", "title": "OpenMM paths: TorchForce and PythonForce vs the bare model call",
         "args": ["openmm"]},
        {"name": "committee", "title": "Committee cost: M members vs one", "args": ["committee"]},
        {"name": "latency", "title": "Model call latency: TorchScript vs compiled, 9 to 10,000 atoms, GFLOP/s vs peak",
         "args": ["latency"]},
        {"name": "warmup", "title": "Warm-up cliff: MD on a fresh module vs one that met 100 other shapes",
         "args": ["warmup"]},
        {"name": "models", "title": "Built-in vs MACE committees trained on the same frames for the same wall time (ethanol, aspirin, copper)",
         "args": ["models"]},
        {"name": "active", "title": "Active learning vs random frames (ethanol, GFN2-xTB)",
         "args": ["active", "--pool", "3", "--select", "diverse", "--steps", "12000",
                  "--out", os.path.join(out, "active")], "plots": os.path.join(out, "active")},
        {"name": "uncertainty", "title": "Uncertainty calibration on fresh GFN2-xTB frames, 300 and 700 K (ethanol, aspirin)",
         "args": ["uncertainty"]},
        {"name": "observables", "title": "Observables with credible intervals vs a GFN2-xTB run (ethanol, 300 K)",
         "args": ["observables", "--out", os.path.join(out, "observables")],
         "plots": os.path.join(out, "observables")},
        {"name": "stability", "title": "Stability: time to a broken bond, loop off vs on (ethanol, 500 K)",
         "args": ["stability", "--out", os.path.join("runs", "bench_stability")],
         "plots": os.path.join("runs", "bench_stability")},
    ]


def _mlmd_command() -> List[str]:
    script = os.path.join(os.path.dirname(sys.executable), "mlmd")
    return [script] if os.path.exists(script) else [sys.executable, "-c", "import sys; from mlmd.cli import main; "
                                                                          "sys.exit(main())"]


def run_section(section: Dict, out: str) -> Dict:
    """Run one benchmark, echoing its output; returns its log, wall time and exit code."""
    command = _mlmd_command() + ["bench"] + section["args"]
    log_path = os.path.join(out, f"{section['name']}.log")
    env = dict(os.environ, COLUMNS="140", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   cwd=_ROOT)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = process.wait()
    wall = time.perf_counter() - start
    with open(log_path) as handle:
        text = _ANSI.sub("", handle.read())
    return {"log": text, "wall_s": wall, "returncode": code, "log_path": log_path}


def _tail(text: str, lines: int) -> str:
    kept = [line.rstrip() for line in text.splitlines()
            if line.strip() and "Warning" not in line and "warnings.warn" not in line and not _PROGRESS.search(line)
            and not _GLOG.match(line)]
    return "\n".join(kept[-lines:])


def _copy_plots(section: Dict, figures: str) -> List[str]:
    folder = section.get("plots")
    if not folder or not os.path.isdir(os.path.join(_ROOT, folder)):
        return []
    copied = []
    for png in sorted(glob.glob(os.path.join(_ROOT, folder, "*.png"))):
        target = os.path.join(figures, f"{section['name']}_{os.path.basename(png)}")
        shutil.copyfile(png, target)
        copied.append(os.path.relpath(target, _ROOT))
    return copied


def _section_markers(name: str):
    return f"<!-- bench {name} -->", f"<!-- /bench {name} -->"


def section_text(result: Dict, started: str) -> str:
    """One benchmark's part of the block: title, exact command, when and how long, the tail
    of its printed tables and its plots, between its own markers."""
    section = result["section"]
    begin, end = _section_markers(section["name"])
    status = "" if result["returncode"] == 0 else f" — **exited {result['returncode']}**, see `{result['log_path']}`"
    lines = [begin, f"### {section['title']}", "",
             f"`mlmd bench {' '.join(section['args'])}` (run {started}, {result['wall_s'] / 60:.1f} min){status}", "",
             "```text", _tail(result["log"], section.get("tail", 40)), "```", ""]
    lines += [f"![{section['name']}]({path})" for path in result["plots"]]
    if result["plots"]:
        lines.append("")
    lines.append(end)
    return "\n".join(lines)


def previous_sections(block: str) -> Dict[str, str]:
    """name -> text of each benchmark's part in an earlier block, so that a run of some
    benchmarks (``--only``) keeps the latest results of the others."""
    found = {}
    for name in re.findall(r"<!-- bench (\S+) -->", block):
        begin, end = _section_markers(name)
        if end in block:
            found[name] = begin + block.split(begin, 1)[1].split(end, 1)[0] + end
    return found


def current_block(path: str) -> str:
    """The generated block of ``path`` ("" if none)."""
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        return text.split(BEGIN, 1)[1].split(END, 1)[0]
    return ""


def report_block(results: Sequence[Dict], started: str, previous: str = "") -> str:
    """The generated block: the benchmarks of ``results`` as run now, the others as they were
    in ``previous`` (an earlier block), in the order of :func:`sections`."""
    import torch

    parts = previous_sections(previous)
    for r in results:
        parts[r["section"]["name"]] = section_text(r, started)
    order = [s["name"] for s in sections("")]
    names = [n for n in order if n in parts] + [n for n in parts if n not in order]
    lines = [BEGIN, "", "## Latest `mlmd bench all` results", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads by default; no GPU unless a row says so. Each benchmark ran alone; "
             "each part says when (`mlmd bench all --only NAME` reruns one and keeps the others).", ""]
    for name in names:
        lines += [parts[name], ""]
    lines.append(END)
    return "\n".join(lines)


def write_report(block: str, path: str) -> None:
    """Replace the generated block of ``path`` (or append it); the rest of the file is kept."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def bench_all(out: str = os.path.join("runs", "bench_all"), report: str = os.path.join(_ROOT, "BENCHMARKS.md"),
              only: Optional[Sequence[str]] = None, skip: Sequence[str] = ()) -> List[Dict]:
    """Run the benchmarks (all, or ``only`` those, minus ``skip``) and write ``report``.

    A relative ``out`` is taken from the repository root, where the benchmarks run."""
    chosen = [s for s in sections(out) if (not only or s["name"] in only) and s["name"] not in skip]
    known = {s["name"] for s in sections(out)}
    unknown = sorted((set(only or ()) | set(skip)) - known)
    if unknown:
        raise InputError(f"only/skip: unknown benchmark(s) {unknown}; choose from {sorted(known)}")
    os.makedirs(os.path.join(_ROOT, out) if not os.path.isabs(out) else out, exist_ok=True)
    figures = os.path.join(_ROOT, "benchmarks", "figures")
    os.makedirs(figures, exist_ok=True)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    previous = current_block(report)
    results = []
    for section in chosen:
        print(f"\n=== mlmd bench {' '.join(section['args'])}", flush=True)
        result = run_section(section, out if os.path.isabs(out) else os.path.join(_ROOT, out))
        result["section"] = section
        result["plots"] = _copy_plots(section, figures)
        results.append(result)
        # written after every benchmark: an interrupted run keeps what it measured
        write_report(report_block(results, started, previous), report)
    failed = [r["section"]["name"] for r in results if r["returncode"] != 0]
    print(f"\nwrote {report}" + (f"; failed: {failed}" if failed else ""))
    return results
