"""The benchmarks docs/benchmarks.md cites keep running: each fast one runs once with its smallest arguments
and prints its ratio line. Not a measurement (CI shares its cores); a script that no longer runs is the
failure this catches. The slow ones (the learner step, kept logits, memory, the server benches) take
minutes each and are run by hand (`make bench`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

CASES = {
    "bench_config_compose.py": (["1"],
                                r"ratio coordexp / bare Hydra: \d+\.\d\d \(target <= 1\.3\), 1 runs each"),
    "bench_channel_b_core.py": ([], r"parse\+match\+target, 50 objects :\s+\d+ us"),
    "bench_adapter_state.py": ([], r"dora\s+AdamW state\s+[\d.]+ MiB .*state ratio 0\.\d+"),
    "bench_sharded_sync.py": (["64", "2", "1"],
                              r"sharded 2-rank gloo, bucket\s+16 MiB .* = [\d.]+x unsharded"),
    "bench_packing.py": (["1", "1024", "smoke/ab_mixed"],
                         r"channel B: unpacked x16 .*\(1\.00x\) .* packed\s+[\d.]+ samples/s \([\d.]+x\)"),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_a_benchmark_runs_and_prints_its_ratio(script):
    args, line = CASES[script]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(line, proc.stdout), proc.stdout


@pytest.mark.parametrize(("script", "keys"), [
    ("bench_convert.py", {"resize_1_worker", "resize_2_workers", "resize_2_workers_all_reused"}),
    ("bench_jsonl_load.py", {"eager_load_s", "lazy_index_s", "validate_2_workers_s"}),
])
def test_a_json_benchmark_runs(script, keys):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmarks" / script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert keys <= set(json.loads(proc.stdout.strip().splitlines()[-1]))
