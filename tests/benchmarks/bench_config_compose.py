"""`--cfg job` cost vs a bare Hydra app composing the same tree (target ratio <= 1.3).

Run: python tests/benchmarks/bench_config_compose.py [repeats]
Both commands run as fresh processes, interleaved, so they see the same machine state.
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["+experiment=ab_mixed", "--cfg", "job", "--resolve"]


def timed(cmd):
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main(repeats: int = 10) -> None:
    coordexp = [sys.executable, "-m", "coordexp.train", *ARGS]
    bare = [sys.executable, str(ROOT / "tests/benchmarks/_bare_hydra_app.py"), *ARGS]
    timed(coordexp), timed(bare)  # warm the page cache and .pyc files
    ours, base = [], []
    for _ in range(repeats):
        ours.append(timed(coordexp))
        base.append(timed(bare))
    m_ours, m_base = statistics.median(ours), statistics.median(base)
    print(f"{'command':<48}{'median s':>10}")
    print(f"{'python -m coordexp.train +experiment=ab_mixed --cfg job':<48}{m_ours:>10.3f}")
    print(f"{'bare Hydra app, same tree':<48}{m_base:>10.3f}")
    print(f"ratio coordexp / bare Hydra: {m_ours / m_base:.2f} (target <= 1.3), {repeats} runs each")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
