"""Converter throughput: images/s of ``coordexp.data.convert coco`` on generated 1000x667 JPEGs.

Generates ``--images`` JPEGs (PIL-drawn rectangles and noise, quality 90) with 3 boxes each and a COCO
instances file, then converts them with ``--resize qwen2_5_vl`` (default pixel limits: every image becomes
1008x672) with 1 and 2 workers, each into a fresh folder, and once more into the folder of the 2-worker
run (every image reused: the resumable path), and once with ``--resize none`` (headers only). Prints one
JSON object (wall seconds, images/s, CPU seconds of this process and its workers, load average). Usage:

    python tests/benchmarks/bench_convert.py [--images 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from coordexp.data.convert import ConvertOptions, convert
from coordexp.data.resize import family_resized_size


def make_dataset(root: Path, n: int) -> tuple[Path, Path]:
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    images_dir = root / "images"
    images_dir.mkdir()
    noise = Image.effect_noise((1000, 667), 40).convert("RGB")
    images, anns = [], []
    for i in range(1, n + 1):
        im = noise.copy()
        draw = ImageDraw.Draw(im)
        for j in range(3):
            x, y = rng.randrange(0, 800), rng.randrange(0, 500)
            w, h = rng.randrange(20, 200), rng.randrange(20, 160)
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=tuple(rng.randrange(256) for _ in range(3)))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1 + j, "bbox": [x, y, w, h],
                         "iscrowd": 0, "area": w * h})
        name = f"{i:06d}.jpg"
        im.save(images_dir / name, quality=90)
        images.append({"id": i, "file_name": name, "width": 1000, "height": 667})
    instances = root / "instances.json"
    instances.write_text(json.dumps({"images": images, "annotations": anns,
                                     "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}))
    return instances, images_dir


def _cpu_seconds() -> float:
    """CPU seconds used by this process and its (finished) worker processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        instances, images = make_dataset(root, args.images)
        family_resized_size("qwen2_5_vl", 1000, 667)  # import transformers' smart_resize outside the timings
        out = {"images": args.images, "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
        for label, resize, workers, folder in (("resize_1_worker", "qwen2_5_vl", 1, "w1"),
                                               ("resize_2_workers", "qwen2_5_vl", 2, "w2"),
                                               ("resize_2_workers_all_reused", "qwen2_5_vl", 2, "w2"),
                                               ("no_resize_1_worker", "none", 1, "n1")):
            t, cpu = time.perf_counter(), _cpu_seconds()
            summary = convert(ConvertOptions("coco", instances, images, root / folder, resize=resize,
                                             workers=workers, progress=False))
            seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
            assert summary["images"]["out"] == args.images, summary["images"]
            out[label] = {"seconds": round(seconds, 2), "images_per_s": round(args.images / seconds, 1),
                          "cpu_seconds": round(cpu, 2),
                          "written": summary["images"]["written"], "reused": summary["images"]["reused"]}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
