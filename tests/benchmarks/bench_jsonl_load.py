"""JSONL loading of 100k synthetic records: eager JsonlDetectionDataset vs LazyJsonlDataset.

Prints one JSON object: seconds to build each dataset, to read the first record, to read one rank's shard of
2 completely, and to validate the whole file with 1 and 2 worker processes; and microseconds per image
header read (what the learner's image size check does per image) on 2000 640x480 JPEGs, in one thread and
in a pool of 8 threads. Usage:

    python tests/benchmarks/bench_jsonl_load.py [--records 100000]
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
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
