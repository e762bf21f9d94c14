"""PNG drawing (coordexp.viz) and the training-curves command (coordexp.plot)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from coordexp import plot, viz

GT = [("red square", (100, 100, 400, 400)), ("blue star", (500, 500, 900, 800))]


def _record(pred, matches, *, width=640, height=480, images=(), sample_id="val.jsonl:1"):
    return {"sample_id": sample_id, "width": width, "height": height, "images": list(images),
            "gt": [{"desc": d, "bbox_2d": list(b)} for d, b in GT],
            "pred": [{"desc": d, "bbox_2d": list(b)} for d, b in pred], "matches": {"0.50": matches},
            "invalid_rollout": False, "truncated": False}


PERFECT = _record(GT, [[0, 0, 1.0], [1, 1, 1.0]])
EMPTY = _record([], [])


def test_png_has_the_sample_size_and_perfect_differs_from_empty(tmp_path):
    written = viz.write_sample_pngs([PERFECT, EMPTY], tmp_path, limit=4)
    assert [p.name for p, _ in written] == ["00_val.jsonl_1.png", "01_val.jsonl_1.png"]
    images = []
    for path, _ in written:
        assert path.is_file()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (640, 480)
            images.append(np.asarray(im.convert("RGB")).astype(int))
    assert np.abs(images[0] - images[1]).sum() > 0


def test_colours_mark_matched_false_positive_and_missed():
    def colours(record):
        arr = np.asarray(viz.render_prediction(record).convert("RGB")).reshape(-1, 3)
        return {tuple(c) for c in np.unique(arr, axis=0)}

    perfect, empty = colours(PERFECT), colours(EMPTY)
    assert viz.PRED_TP in perfect and viz.GT_MATCHED in perfect and viz.GT_MISSED in perfect  # legend swatch
    fp_only = colours(_record([("cat", (0, 0, 50, 50))], []))
    assert viz.PRED_FP in fp_only
    # the empty prediction draws every GT as missed; box pixels of TP colour appear only in the legend
    def count(rec, c):
        return int((np.asarray(viz.render_prediction(rec).convert("RGB")) == c).all(-1).sum())

    assert count(EMPTY, viz.GT_MISSED) > count(PERFECT, viz.GT_MISSED)
    assert count(PERFECT, viz.PRED_TP) > count(EMPTY, viz.PRED_TP)
    assert empty != perfect


def test_draws_on_the_real_image_relative_to_the_jsonl(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (320, 200), (10, 200, 30)).save(tmp_path / "imgs" / "a.png")
    record = _record([], [], width=320, height=200, images=["imgs/a.png"])
    image = viz.render_prediction(record, image_root=tmp_path)
    assert image.size == (320, 200)
    assert image.getpixel((2, 198)) == (10, 200, 30)  # untouched corner keeps the photo
    missing = viz.render_prediction(_record([], [], images=["nope.png"]), image_root=tmp_path)
    assert missing.size == (640, 480) and missing.getpixel((2, 478)) == viz.CANVAS


def test_large_pictures_are_scaled_down():
    big = viz.render_prediction(_record(GT, [], width=4000, height=3000), max_side=1000)
    assert big.size == (1000, 750)


# ---------------------------------------------------------------- plot
def _write_metrics(path, n=12):
    with path.open("w") as f:
        for step in range(1, n + 1):
            b = step % 4 != 0
            rec = {"step": step, "loss": 1.0 / step, "loss/total": 1.0 / step, "loss/ce": 0.5 / step,
                   "loss/bbox_smoothl1": 0.1, "loss/bbox_ciou": 0.4, "loss/coord_ce": 0.0,
                   "stage2/channel_b": float(b), "stage2/channel_a": float(not b),
                   "stage2_ab/b_ratio_realized": 0.75}
            if b:
                rec.update({"rollout/f1": step / n, "rollout/parse_truncated_rate": 1 - step / n,
                            "rollout/repeat_terminate_triggered_sequences": 2, "rollout/raw_rollouts": 16,
                            "rollout/invalid_rollout_rate": 0.1})
            f.write(json.dumps(rec) + "\n")
            if step % 6 == 0:
                f.write(json.dumps({"step": step, "eval_rollout/f1": 0.3, "eval_rollout/f1_iou50_95": 0.2,
                                    "eval_rollout/parse_truncated_rate": 0.5,
                                    "eval_rollout/repeat_terminate_triggered_sequences": 1,
                                    "eval_rollout/raw_rollouts": 8}) + "\n")


def test_plot_writes_one_png(tmp_path, capsys):
    _write_metrics(tmp_path / "metrics.jsonl")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 0.')  # a run still writing: partial last line
    assert plot.main([str(tmp_path)]) == 0
    out = tmp_path / "training_curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1300, 850)
    custom = tmp_path / "sub" / "curves.png"
    assert plot.main([str(tmp_path / "metrics.jsonl"), "-o", str(custom)]) == 0 and custom.is_file()


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_plot_fails_clearly_without_metrics(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl" in err
    assert not (tmp_path / "training_curves.png").exists()


def test_plot_rejects_a_corrupt_middle_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    assert plot.main([str(tmp_path)]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err


def test_plot_output_paths_say_what_was_written(tmp_path, capsys):
    """-o: a folder gets training_curves.png inside; no suffix gets .png; the printed path is the file
    written; an unknown suffix or an unwritable place is an error line (exit 2), not a traceback."""
    _write_metrics(tmp_path / "metrics.jsonl")
    capsys.readouterr()
    folder = tmp_path / "plots"
    folder.mkdir()
    for given, written in ((folder, folder / "training_curves.png"),
                           (tmp_path / "curves", tmp_path / "curves.png"),
                           (tmp_path / "c.pdf", tmp_path / "c.pdf")):
        assert plot.main([str(tmp_path), "-o", str(given)]) == 0
        assert capsys.readouterr().out.strip() == str(written) and written.is_file()
    assert plot.main([str(tmp_path), "-o", str(tmp_path / "x.txt")]) == 2
    assert capsys.readouterr().err == (f"error: -o {tmp_path}/x.txt: matplotlib cannot write .txt files; use "
                                       f".png, .pdf or .svg\n")
    (tmp_path / "afile").write_text("")
    assert plot.main([str(tmp_path), "-o", str(tmp_path / "afile" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {tmp_path}/afile/x.png: ") and "Traceback" not in err


def test_labels_no_font_draws_are_named_once_per_process(tmp_path, capsys, monkeypatch):
    """Training's viz/step-N and coordexp.eval's pictures say, as coordexp.data.inspect does, which label
    characters are drawn as boxes (no colour emoji font is used), each character once per process."""
    from coordexp.data import fonts

    monkeypatch.setattr(fonts, "_NOTED", set())
    emoji = _record([("dog 🐶", (100, 100, 400, 400))], [])
    viz.write_sample_pngs([PERFECT, emoji], tmp_path / "a", limit=4)
    assert capsys.readouterr().err == fonts.missing_glyphs_note(["🐶"]) + "\n"
    viz.write_sample_pngs([emoji], tmp_path / "b", limit=4)  # the next eval: said already
    assert capsys.readouterr().err == ""
    viz.write_sample_pngs([PERFECT], tmp_path / "c", limit=4)
    assert capsys.readouterr().err == ""  # DejaVu Sans draws every label
