"""Runs the speed benchmark suite of issue 10 and writes docs/performance.md (and its raw JSON).

    python3 benchmarks/run_all.py                       # everything, 1 thread, 5 rounds (~10-15 min)
    python3 benchmarks/run_all.py --only conv linear    # some groups
    python3 benchmarks/run_all.py --quick --out /tmp/p.md   # tiny shapes: a smoke test

The same as ``sparselearn bench``. See sparselearn/experiments/bench.py for what each group measures (its helpers in bench_util.py).
The committed docs/performance.md is two such runs and the hand-written notes of
docs/performance-notes/, put together by benchmarks/assemble_report.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sparselearn.experiments.speed_commands import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
