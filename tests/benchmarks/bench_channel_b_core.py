"""Channel-B core timings: parse + match + target per rollout, its scaling, and Hungarian on 100 x 100.

Run: python tests/benchmarks/bench_channel_b_core.py
Uses the real byte-level BPE test tokenizer (tests/unit/_bpe.py); decoded pieces come from a precomputed
id -> piece table, as the trainer's tokenizer adapter does.
"""

from __future__ import annotations

import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _bpe import build_test_tokenizer, tokenizer_fns

from coordexp.coordjson import CoordObject, build_channel_b_target, parse_rollout, serialize_objects
from coordexp.matching import match_boxes

COSTS = {"top_k": 5, "iou_gate": 0.3, "fp_cost": 0.5, "fn_cost": 2.0}
WORDS = ["red", "blue", "small", "large", "square", "circle", "cat", "dog", "car", "tree"]


def scenario(num_objects: int, seed: int = 0):
    """GT of `num_objects` boxes; the rollout repeats 90% of them jittered, adds 10% false positives."""
    rng = random.Random(seed)

    def box():
        x, y = rng.randint(0, 900), rng.randint(0, 900)
        return (x, y, x + rng.randint(20, 99), y + rng.randint(20, 99))

    def desc():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))

    def jittered(obj):
        x1, y1, x2, y2 = (min(max(v + rng.randint(-2, 2), 0), 999) for v in obj.bbox)
        return CoordObject(obj.desc, (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))

    gt = [CoordObject(desc(), box()) for _ in range(num_objects)]
    predictions = [jittered(o) for o in gt[: num_objects - num_objects // 10]]
    predictions += [CoordObject(desc(), box()) for _ in range(num_objects // 10)]
    return gt, serialize_objects(predictions, "desc_first")


def time_call(fn, repeats: int, clock=time.process_time, rounds: int = 7) -> float:
    """Seconds per call: the best round's mean (as timeit does). The default clock is process CPU time,
    so that other processes competing for the 2 cores inflate it less than elapsed time."""
    samples = []
    for _ in range(rounds):
        start = clock()
        for _ in range(repeats):
            fn()
        samples.append((clock() - start) / repeats)
    return min(samples)


def channel_b_pipeline(tok, ids, pieces, gt):
    fns = tokenizer_fns(tok)

    def parse():
        return parse_rollout(
            ids,
            pieces,
            coord_vocab=tok.coord_vocab,
            stop_ids=[tok.eos_id],
            field_order="desc_first",
            encode=tok.encode,
            decode_token=tok.decode_token,
        )

    def match(parsed):
        return match_boxes([o.bbox for o in parsed.objects], [g.bbox for g in gt], **COSTS)

    def target(parsed, matched):
        return build_channel_b_target(
            parsed, gt, matched.index_pairs, field_order="desc_first", desc_ce_weight=1.0, **fns
        )

    return parse, match, target


def measure_rollout(tok, num_objects: int, repeats: int) -> dict[str, float]:
    gt, text = scenario(num_objects)
    ids = tok.encode(text) + [tok.eos_id]
    pieces = tok.pieces(ids)
    parse, match, target = channel_b_pipeline(tok, ids, pieces, gt)
    parsed = parse()
    matched = match(parsed)
    built = target(parsed, matched)
    assert len(parsed.objects) == num_objects and parsed.num_dropped == 0
    return {
        "tokens": len(ids),
        "target_tokens": len(built.input_ids),
        "parse": time_call(parse, repeats),
        "match": time_call(lambda: match(parsed), repeats),
        "target": time_call(lambda: target(parsed, matched), repeats),
        "total": time_call(lambda: _parse_match_target(parse, match, target), repeats),
        "total_wall": time_call(
            lambda: _parse_match_target(parse, match, target), repeats, time.perf_counter
        ),
    }


def _parse_match_target(parse, match, target):
    parsed = parse()
    return target(parsed, match(parsed))


def measure_hungarian(size: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    lo = rng.integers(0, 900, size=(size, 2))
    gts = np.concatenate([lo, lo + rng.integers(20, 99, size=(size, 2))], axis=1)
    preds = gts + rng.integers(-3, 4, size=gts.shape)
    return time_call(lambda: match_boxes(preds, gts, **COSTS), repeats)


def main() -> None:
    tok = build_test_tokenizer()
    rows = {n: measure_rollout(tok, n, repeats=max(20, 2000 // n)) for n in (10, 50, 100)}
    hungarian = measure_hungarian(100, repeats=50)

    print(
        f"Channel-B core benchmark  (Python {platform.python_version()}, {platform.machine()}, "
        f"numpy {np.__version__})"
    )
    print()
    print("CPU microseconds per rollout (best of 7 rounds); 'wall' is the same for elapsed time.")
    print(f"{'objects':>7} {'tokens':>7} {'parse':>7} {'match':>7} {'target':>7} {'total':>7} {'wall':>7}")
    for n, row in rows.items():
        print(
            f"{n:>7} {row['tokens']:>7} {row['parse'] * 1e6:>7.0f} {row['match'] * 1e6:>7.0f} "
            f"{row['target'] * 1e6:>7.0f} {row['total'] * 1e6:>7.0f} {row['total_wall'] * 1e6:>7.0f}"
        )
    print()
    total_50 = rows[50]["total"]
    ratio = rows[100]["total"] / rows[10]["total"]
    print(
        f"parse+match+target, 50 objects : {total_50 * 1e6:8.0f} us   (target < 2000 us)  "
        f"{'OK' if total_50 < 2e-3 else 'SLOW'}"
    )
    per_object = (rows[100]["total"] - rows[10]["total"]) / 90
    fixed = rows[10]["total"] - 10 * per_object
    print(f"scaling 100 vs 10 objects      : {ratio:8.1f} x    (a fixed cost per rollout + a linear term)")
    print(f"  per object | fixed           : {per_object * 1e6:8.1f} us | {fixed * 1e6:.0f} us")
    print(
        f"match_boxes 100 x 100          : {hungarian * 1e6:8.0f} us   (target < 5000 us)  "
        f"{'OK' if hungarian < 5e-3 else 'SLOW'}"
    )


if __name__ == "__main__":
    main()
