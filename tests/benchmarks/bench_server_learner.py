"""Does a rollout server in the run slow the learner down? The smoke leaf trained for a few steps with
``rollout=hf`` and with ``rollout=vllm_server``, side by side: the median Channel-B loss forward right after
the step's rollouts (``time/forward_s``), the median Channel-A forward, the rollout call and rollout tokens/s.

Run: python tests/benchmarks/bench_server_learner.py [steps] [KEY=VALUE ...]
(KEY=VALUE pairs are extra Hydra overrides for both runs.) Target: server-mode Channel-B forward within 1.3x
of HF mode (rollout time excluded).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("/tmp/coordexp-bench-server-learner")


def run(mode: str, steps: int, extra: list[str]) -> dict:
    run_dir = OUT / mode
    shutil.rmtree(run_dir, ignore_errors=True)  # a run dir that exists is resumed and its metrics appended
    cmd = [sys.executable, "-m", "coordexp.train", "+experiment=smoke/ab_mixed", f"rollout={mode}",
           f"training.max_steps={steps}", "training.logging_steps=1", "training.eval_strategy=no",
           "training.save_strategy=no", f"hydra.run.dir={run_dir}", *extra]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "time/forward_s" in r]
    b = [r for r in rows if r.get("stage2/channel_b") == 1.0]
    a = [r for r in rows if r.get("stage2/channel_b") == 0.0]
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    phases = meta.get("launcher", {}).get("timeline", {}).get("phases_s", {})
    return {
        "forward_B_s": statistics.median(r["time/forward_s"] for r in b),
        "forward_A_s": statistics.median(r["time/forward_s"] for r in a) if a else float("nan"),
        "rollout_s": statistics.median(r["time/rollout_generate_s"] for r in b),
        "tokens_per_s": statistics.median(r.get("rollout/gen_tokens_per_s", 0.0) for r in b),
        "train_s": phases.get("end", wall),
        "wall_s": wall,
    }


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    extra = sys.argv[2:]
    res = {mode: run(mode, steps, extra) for mode in ("hf", "vllm_server")}
    print(f"{steps} steps of smoke/ab_mixed, overrides {extra or 'none'}")
    print(f"{'':22s}{'hf':>10s}{'server':>10s}{'ratio':>8s}")
    for key in ("forward_B_s", "forward_A_s", "rollout_s", "tokens_per_s", "train_s", "wall_s"):
        h, s = res["hf"][key], res["vllm_server"][key]
        print(f"{key:22s}{h:10.3f}{s:10.3f}{s / h if h else float('nan'):8.2f}")


if __name__ == "__main__":
    main()
