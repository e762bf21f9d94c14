"""Channel-B step wall time in server mode, pipelined vs serial, on the same rollouts: one Hydra sweep with
the coordexp launcher (one real ``swift rollout`` server shared by both jobs), packed Channel-B steps of the
smoke b_only leaf with ``rollout_matching.pipeline=true,false``.

Per job: median ``time/step_s`` (rollouts + segments + packs of the step), median generation time and the
time the learner waited for rollout chunks; overlap fraction = 1 - wait / generate (the share of the
generation the learner spent training instead of waiting).

Run: python tests/benchmarks/bench_pipeline.py [steps] [decode_batch_size]
Target: pipelined / serial step time <= 0.8. It also prints the bound perfect overlap allows: the serial step
minus the shorter of generation and training, over the serial step (no pipelining can beat it).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path("/tmp/coordexp-bench-pipeline")


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    dbs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    shutil.rmtree(OUT, ignore_errors=True)
    cmd = [sys.executable, "-m", "coordexp.train", "-m", "hydra/launcher=coordexp",
           "+experiment=smoke/b_only", f"hydra.sweep.dir={OUT}", f"training.max_steps={steps}",
           "training.logging_steps=1", "training.eval_strategy=no", "training.save_strategy=no",
           "training.per_device_train_batch_size=1", "training.packing=true", "training.packing_length=400",
           f"rollout_matching.decode_batch_size={dbs}", "rollout_matching.pipeline=true,false"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = {}
    for job, name in (("0", "pipelined"), ("1", "serial")):
        rows = [json.loads(line) for line in (OUT / job / "metrics.jsonl").read_text().splitlines() if line]
        rows = [r for r in rows if "time/step_s" in r][1:]  # the first step pays one-time costs
        res[name] = {
            "step_s": statistics.median(r["time/step_s"] for r in rows),
            "generate_s": statistics.median(r["time/rollout_generate_s"] for r in rows),
            "train_s": statistics.median(r["time/forward_s"] for r in rows),
            # serial: the learner waits for the whole generation
            "wait_s": statistics.median(r.get("time/rollout_wait_s", r["time/rollout_generate_s"])
                                        for r in rows),
        }
    p, s = res["pipelined"], res["serial"]
    print(f"{steps} Channel-B steps (first dropped), 16 samples each, decode_batch_size {dbs}, "
          f"400-token packs")
    for key in ("step_s", "generate_s", "train_s", "wait_s"):
        print(f"  {key:12s} pipelined {p[key]:7.3f}   serial {s[key]:7.3f}")
    print(f"  step time pipelined / serial: {p['step_s'] / s['step_s']:.2f}")
    # perfect overlap hides the shorter of generation and training, never more
    bound = (s["step_s"] - min(s["generate_s"], s["train_s"])) / s["step_s"]
    print(f"  bound with perfect overlap:   {bound:.2f} (serial step minus the shorter of generation and "
          f"training)")
    print(f"  overlap fraction (pipelined): {1 - p['wait_s'] / p['generate_s']:.2f}")


if __name__ == "__main__":
    main()
