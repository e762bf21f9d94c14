"""JSONL loading of 100k synthetic records: eager JsonlDetectionDataset vs LazyJsonlDataset.

Prints one JSON object: seconds to build each dataset, to read the first record, to read one rank's shard of
2 completely, and to validate the whole file with 1 and 2 worker processes; and microseconds per image
header read (what the learner's image size check does per image) on 2000 640x480 JPEGs, in one thread and
in a pool of 8 threads. Usage:

    python tests/benchmarks/bench_jsonl_load.py [--records 100000]

``--train``: instead, time ``python -m coordexp.train`` (tiny model, data.kind=jsonl on the synthetic file,
rollout=hf, training.max_steps=1, one sample per rank per step, eval and saving off) from process start to
the first optimizer step's console line and to its exit, for the learner of ``--before`` (a git ref,
exported with ``git archive``; default: the commit before the learner read JSONL lazily) and for this
working tree, with 1 and 2 learner ranks (``--nproc``), side by side. ``first_step_s`` includes that step
(``step_s``, from metrics.jsonl), so ``first_step_s - step_s`` is the time before training starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coordexp.data.jsonl import load_jsonl
from coordexp.data.lazy_jsonl import LazyJsonlDataset
from coordexp.data.synthetic import write_synthetic_jsonl


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 3)


def _header_us(tmp: Path, n: int = 2000) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    image = Image.effect_noise((640, 480), 40).convert("RGB")
    paths = [tmp / f"{i}.jpg" for i in range(n)]
    for p in paths:
        image.save(p, quality=80)

    def size(p):
        with Image.open(p) as im:
            return im.size

    _, one = _timed(lambda: [size(p) for p in paths])
    with ThreadPoolExecutor(8) as pool:
        _, eight = _timed(lambda: list(pool.map(size, paths, chunksize=64)))
    return {"header_read_us_1_thread": round(one / n * 1e6, 1),
            "header_read_us_8_threads": round(eight / n * 1e6, 1)}


REPO = Path(__file__).resolve().parents[2]
BEFORE_LAZY_LEARNER = "c297926"  # every rank parsed, held and checked the whole training file


def _train_once(code: Path, jsonl: Path, run_dir: Path, nproc: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "coordexp.train", "+experiment=smoke/a_only", "rollout=hf", "data=jsonl",
           f"data.train_jsonl={jsonl}", "model.tiny_stage1_steps=0", "training.max_steps=1",
           f"training.nproc_per_node={nproc}", f"training.effective_batch_size={nproc}",
           "training.eval_strategy=no", "training.save_strategy=no", "training.report_to=[]",
           f"training.output_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"]
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1",
           "COORDEXP_CACHE_DIR": os.environ.get("COORDEXP_CACHE_DIR", str(REPO / ".cache" / "coordexp"))}
    where = subprocess.run([sys.executable, "-c", "import coordexp; print(coordexp.__file__)"], env=env,
                           cwd=run_dir.parent, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(code), f"{where} is not under {code}"  # the tree being timed
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    first, tail = None, []
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        tail = (tail + [line])[-20:]
        if first is None and "step 1/1 |" in line:
            first = time.perf_counter() - t0
    code_ = proc.wait()
    total = time.perf_counter() - t0
    if code_ != 0 or first is None:
        raise SystemExit(f"{' '.join(cmd)} exited {code_}:\n{''.join(tail)}")
    step = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["time/step_s"]
    return {"first_step_s": round(first, 2), "step_s": round(step, 2), "exit_s": round(total, 2)}


def train_to_first_step(records: int, before: str, nprocs: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = write_synthetic_jsonl(tmp / "train.jsonl", n=records, seed=1)
        old = tmp / "before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", before, "coordexp", "conf"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        out: dict = {"records": records, "file_mb": round(jsonl.stat().st_size / 2 ** 20, 1),
                     "before": before, "cpus": os.cpu_count()}
        for nproc in nprocs:
            for name, code in (("before", old), ("after", REPO)):
                out[f"{name}_nproc{nproc}"] = {**_train_once(code, jsonl, tmp / f"{name}{nproc}", nproc),
                                              "load_average_1min": round(os.getloadavg()[0], 1)}
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--train", action="store_true", help="time coordexp.train to the first step instead")
    parser.add_argument("--before", default=BEFORE_LAZY_LEARNER, help="git ref of the 'before' learner")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="learner ranks to time")
    args = parser.parse_args()
    if args.train:
        print(json.dumps(train_to_first_step(args.records, args.before, args.nproc), indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        write_synthetic_jsonl(path, n=args.records, seed=1)
        eager, t_eager = _timed(lambda: load_jsonl(path))
        del eager
        lazy, t_index = _timed(lambda: LazyJsonlDataset(path))
        _, t_first = _timed(lambda: lazy[0])
        shard = lazy.shard(0, 2)
        _, t_shard = _timed(lambda: sum(len(s.objects) for s in shard))
        _, t_val1 = _timed(lambda: lazy.validate(workers=1, progress=False))
        _, t_val2 = _timed(lambda: lazy.validate(workers=2, progress=False))
        headers = _header_us(Path(tmp))
        print(json.dumps({**headers, "load_average_1min": os.getloadavg()[0], "records": args.records,
                          "file_mb": round(path.stat().st_size / 2 ** 20, 1),
                          "eager_load_s": t_eager, "lazy_index_s": t_index, "lazy_first_record_s": t_first,
                          "lazy_read_rank_shard_of_2_s": t_shard, "validate_1_worker_s": t_val1,
                          "validate_2_workers_s": t_val2}))


if __name__ == "__main__":
    main()
