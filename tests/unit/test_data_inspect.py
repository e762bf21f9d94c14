"""coordexp.data.inspect: pictures, statistics and histograms of a converted fixture."""

from __future__ import annotations

import json
import warnings

import pytest
from coco_fixture import write_coco
from PIL import Image

from coordexp.data.convert import ConvertOptions, convert
from coordexp.data.fonts import label_font, missing_glyphs
from coordexp.data.inspect import PALETTE, main, size_class
from coordexp.data.synthetic import write_synthetic_jsonl


def test_size_classes_use_coco_limits():
    assert [size_class(a) for a in (0, 1023.9, 1024, 9215.9, 9216)] == ["small", "small", "medium", "medium",
                                                                         "large"]


def test_inspect_converted_coco(tmp_path, capsys):
    instances, images = write_coco(tmp_path / "src")
    convert(ConvertOptions("coco", instances, images, tmp_path / "data", progress=False))
    assert main([str(tmp_path / "data" / "instances_val.jsonl"), "--out", str(tmp_path / "look")]) == 0
    stats = json.loads((tmp_path / "look" / "stats.json").read_text())
    assert stats["records"] == 2 and stats["objects"] == 5 and stats["records_with_images"] == 2
    assert stats["objects_per_image"] == {"min": 2, "median": 2.5, "mean": 2.5, "max": 3,
                                          "counts": {"2": 1, "3": 1}}
    # original pixels: person 29.9 x 39.7 and 100 x 67, bicycle 49.9 x 59.9 (medium); 1000 x 667, 200 x 300.3
    assert {k: stats["box_sizes"][k] for k in ("small", "medium", "large", "area_frame")} == \
        {"small": 0, "medium": 3, "large": 2, "area_frame": "original"}
    assert stats["box_sizes"]["area_px"]["max"] == 667000.0
    assert stats["top_descs"] == [["bicycle", 2], ["person", 2], ["traffic light", 1]]
    assert stats["distinct_descs"] == 3 and stats["image_sizes"] == {"1000x667": 1, "333x517": 1}
    pictures = sorted(p.name for p in (tmp_path / "look" / "samples").iterdir())
    assert pictures == ["00000_a.png", "00001_b.png"]
    with Image.open(tmp_path / "look" / "samples" / "00001_b.png") as im:
        assert im.size == (1000, 667)
        assert im.getpixel((500, 0)) == PALETTE[0]        # traffic light: the whole image, bins 0..999
        assert im.getpixel((501, 300)) == PALETTE[1]      # bicycle: left edge at bin 501 = pixel 501
        assert im.getpixel((300, 300)) == (30, 30, 30)    # the image itself
    with Image.open(tmp_path / "look" / "histograms.png") as im:
        assert im.size == (990, 720)
    assert "2 records, 5 objects, 3 descs; boxes small/medium/large 0/3/2 (original pixels)" in \
        capsys.readouterr().out


def test_inspect_text_records_on_a_blank_canvas(tmp_path):
    write_synthetic_jsonl(tmp_path / "s.jsonl", n=5, seed=1)
    args = [str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o"), "--limit", "2", "--top-k", "3"]
    assert main(args) == 0
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["records"] == 5 and stats["pictures"] == 2 and len(stats["top_descs"]) == 3
    assert stats["box_sizes"]["area_frame"] == "record"
    assert sorted(p.name for p in (tmp_path / "o" / "samples").iterdir()) == ["00000_canvas.png",
                                                                              "00001_canvas.png"]


def test_a_coco_instances_file_is_refused_with_the_fix(tmp_path, capsys):
    instances, _ = write_coco(tmp_path)
    assert main([str(instances), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {instances}:1: unknown key(s) 'annotations', 'categories'")
    assert "convert it first: python -m coordexp.data.convert coco --instances" in err
    assert "Traceback" not in err


def test_labels_beyond_ascii_get_a_font_that_draws_them(tmp_path, capsys):
    record = {"width": 512, "height": 512, "objects": [
        {"desc": "café crème", "bbox_2d": [10, 10, 400, 400]},
        {"desc": "🚗", "bbox_2d": [600, 100, 900, 300]},
        {"desc": "Ωμέγα", "bbox_2d": [500, 500, 900, 900]}, {"desc": "猫", "bbox_2d": [100, 600, 300, 900]}]}
    (tmp_path / "u.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([str(tmp_path / "u.jsonl"), "--out", str(tmp_path / "o")]) == 0
    assert not [w for w in caught if "Glyph" in str(w.message)]  # said once below, not once per glyph
    for text in ("café crème", "Ωμέγα"):  # Pillow's own font has neither; DejaVu Sans has both
        assert label_font(12, text).path.endswith("DejaVuSans.ttf") and not missing_glyphs([text])
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    # no colour emoji font is used; 猫 is drawn when a CJK font is installed (none on a bare machine)
    assert "🚗" in stats["glyphs_without_font"] and set(stats["glyphs_without_font"]) <= {"猫", "🚗"}
    err = capsys.readouterr().err
    assert f"note: no installed font draws {' '.join(stats['glyphs_without_font'])} (drawn as boxes" in err


def test_missing_and_other_size_images_are_named(tmp_path, capsys):
    Image.new("RGB", (168, 112), (30, 30, 30)).save(tmp_path / "small.png")
    Image.new("RGB", (100, 80), (30, 30, 30)).save(tmp_path / "fits.png")
    objects = [{"desc": "红绿灯", "bbox_2d": [0, 0, 500, 500]}]
    records = [{"images": ["fits.png"], "width": 100, "height": 80, "objects": objects},
               {"images": ["nothere.png"], "width": 100, "height": 80, "objects": objects},
               {"images": ["small.png"], "width": 500, "height": 112, "objects": objects}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                      encoding="utf-8")
    assert main([str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")]) == 0
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["pictures_without_image_file"] == 1 and stats["pictures_of_another_size"] == 1
    jsonl = tmp_path / "d.jsonl"
    assert stats["image_notes"] == [
        f"{jsonl}:2: no image file {tmp_path / 'nothere.png'} (drawn on a blank canvas)",
        f"{jsonl}:3: small.png is 168x112, the record says 500x112 (drawn resized to the record's size; "
        f"training accepts it only if the model's image processor resizes it to exactly that, docs/vlm.md)"]
    err = capsys.readouterr().err
    assert err.startswith("note: 2 of 3 pictures do not show their record's image as it is:\n  " +
                          "\n  ".join(stats["image_notes"]) + "\n")


@pytest.mark.parametrize("args,message", [
    (["--limit", "-1"], "--limit and --top-k must be >= 0"),
    (["--out", "FILE"], "--out FILE is a file; pass a folder (it is created when missing)"),
])
def test_bad_arguments_are_usage_errors(tmp_path, capsys, args, message):
    record = {"width": 10, "height": 10, "objects": [{"desc": "a", "bbox_2d": [1, 1, 5, 5]}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "FILE").write_text("")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message.replace("FILE", str(tmp_path / "FILE")))
