"""benchmarks/compile_graphs.py: counts each loss's graphs and breaks under torch.compile and writes them."""

import json

from benchmarks.compile_graphs import main


def test_counts_graphs_and_breaks_beside_eager_and_writes_them(tmp_path):
    out = tmp_path / "compile.json"
    rows = main(["--losses", "bank", "--backends", "aot_eager", "--steps", "2", "--out", str(out)])
    eager, compiled = rows
    assert (eager["backend"], eager["graphs"], eager["graph_breaks"]) == ("eager", 0, 0)
    # the loss's own code around its eager bookkeeping: at least one graph, broken where the bookkeeping runs
    assert compiled["backend"] == "aot_eager" and compiled["graphs"] >= 2 and compiled["graph_breaks"] >= 1
    saved = json.loads(out.read_text())
    assert saved["results"] == rows and saved["command"].startswith("compile_graphs.py --losses bank")
    assert len(saved["provenance"]["commit"]) == 40
