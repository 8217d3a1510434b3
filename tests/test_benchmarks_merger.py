"""Smoke run of benchmarks/merger_scale.py in its --quick mode: it runs, writes its JSON and prints its table."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "merger_scale.py"


def test_quick_run_writes_results_and_prints_a_table(tmp_path):
    out = tmp_path / "merger.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    saved = json.loads(out.read_text())
    assert len(saved["provenance"]["commit"]) == 40 and saved["command"].startswith("merger_scale.py --quick")
    results = saved["results"]
    cases = [r["case"] for r in results]
    assert cases[:3] == ["bare matmul + topk(5)", "TorchSearch, self excluded", "TorchSearch, 10% in merged groups excluded"]
    # the exact search finds the same nearest neighbour as the bare product's second column
    assert results[1]["agreement_with_floor"] == 1.0
    approx = next(r for r in results if r["part"] == "approx")
    assert 0.0 <= approx["recall"] <= 1.0 and approx["peak_mb"] > 0 and approx["n"] == 50_000
    assert any(case.startswith("merge round") for case in cases)
    assert "| part | case | N | seconds |" in done.stdout


def test_help_describes_the_targets():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "within 1.5x" in done.stdout and "--quick" in done.stdout
