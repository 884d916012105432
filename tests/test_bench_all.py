"""mlmd bench all: the generated block of BENCHMARKS.md is replaced, the hand-written rest kept."""
import pytest

from mlmd.bench_all import BEGIN, END, bench_all, report_block, write_report


def _result(name, log, code=0):
    return {"section": {"name": name, "title": name.title(), "args": [name]}, "log": log, "wall_s": 60.0,
            "returncode": code, "log_path": f"runs/bench_all/{name}.log", "plots": []}


def test_report_block_replaced_and_hand_written_sections_kept(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\n## Analysis by hand\n\nkeep me\n")
    write_report(report_block([_result("md", "| a | b |\n| 1 | 2 |")], "first"), str(report))
    first = report.read_text()
    assert "keep me" in first and first.count(BEGIN) == 1 and "| 1 | 2 |" in first
    with open(report, "a") as handle:
        handle.write("\n## Written after the block\n\nkeep me too\n")
    write_report(report_block([_result("md", "| 3 | 4 |"), _result("models", "boom", code=1)], "second"), str(report))
    second = report.read_text()
    assert second.count(BEGIN) == 1 and second.count(END) == 1
    assert "| 1 | 2 |" not in second and "| 3 | 4 |" in second
    assert "keep me" in second and "keep me too" in second
    assert "exited 1" in second and "run second" in second


def test_a_partial_run_keeps_the_other_benchmarks_latest_results(tmp_path):
    from mlmd.bench_all import current_block

    report = tmp_path / "BENCHMARKS.md"
    write_report(report_block([_result("neighbors", "| vesin 1 |"), _result("md", "| md 1 |")], "first"), str(report))
    write_report(report_block([_result("md", "| md 2 |")], "second", current_block(str(report))), str(report))
    text = report.read_text()
    assert "| vesin 1 |" in text and "| md 2 |" in text and "| md 1 |" not in text
    assert "run first" in text and "run second" in text
    assert text.index("| vesin 1 |") < text.index("| md 2 |")       # the order of `mlmd bench all`
    assert text.count("<!-- bench md -->") == 1 and text.count("<!-- bench neighbors -->") == 1


def test_progress_bars_and_warnings_stay_out_of_the_report():
    from mlmd.bench_all import _tail

    log = ("loop:  50%|█████     | 300/600 [01:00<01:00,  5.00it/s]\rloop: 100%|██████████| 600/600 [02:00<00:00]\n"
           "x.py:1: FutureWarning: old\n  warnings.warn(msg)\n| arm | labels |\n| loop | 64 |\n")
    assert _tail(log, 40) == "| arm | labels |\n| loop | 64 |"


def test_unknown_benchmark_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only/skip: unknown benchmark"):
        bench_all(out=str(tmp_path), report=str(tmp_path / "B.md"), only=["nieghbors"])


@pytest.mark.parametrize("command", ["run", "learn", "train", "bench", "import-mace", "audit", "export", "label", "info"])
def test_every_command_prints_its_help(command, capsys):
    """argparse formats each help string with %: a bare "90 %" in one crashed `mlmd bench --help`."""
    from mlmd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mlmd" in capsys.readouterr().out
