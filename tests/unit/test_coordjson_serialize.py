import json

import pytest

from coordexp.coordjson import (
    CoordObject,
    FieldOrder,
    canonical_order,
    serialize_append_fragment,
    serialize_objects,
    serialize_record,
    sort_objects,
)
from coordexp.coordjson.serialize import render_records

CAT = CoordObject("cat", (12, 34, 56, 78))
DOG = CoordObject("dog", (1, 2, 3, 4))


def test_desc_first_document_is_exact():
    assert serialize_objects([CAT, DOG], FieldOrder.desc_first) == (
        '{"objects": [{"desc": "dog", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}, '
        '{"desc": "cat", "bbox_2d": [<|coord_12|>, <|coord_34|>, <|coord_56|>, <|coord_78|>]}]}'
    )


def test_geometry_first_document_is_exact():
    assert serialize_objects([CAT], "geometry_first") == (
        '{"objects": [{"bbox_2d": [<|coord_12|>, <|coord_34|>, <|coord_56|>, <|coord_78|>], "desc": "cat"}]}'
    )


def test_empty_document():
    assert serialize_objects([], FieldOrder.desc_first) == '{"objects": []}'


def test_desc_is_json_escaped_and_unicode_kept():
    obj = CoordObject('a "b" \\ c\nd é', (0, 0, 1, 1))
    record = serialize_record(obj, FieldOrder.desc_first)
    assert record.startswith('{"desc": "a \\"b\\" \\\\ c\\nd é", ')
    assert json.loads(record.replace("<|coord_0|>", "0").replace("<|coord_1|>", "1"))["desc"] == obj.desc


def test_objects_sorted_by_min_y_then_min_x_stably():
    a = CoordObject("a", (50, 10, 60, 20))
    b = CoordObject("b", (5, 10, 60, 20))
    c = CoordObject("c", (0, 30, 1, 31))
    d = CoordObject("d", (5, 10, 70, 90))
    assert canonical_order([a, b, c, d]) == [1, 3, 0, 2]
    assert [o.desc for o in sort_objects([a, b, c, d])] == ["b", "d", "a", "c"]
    unsorted = serialize_objects([a, b], FieldOrder.desc_first, sort=False)
    assert unsorted.index('"a"') < unsorted.index('"b"')


def test_append_fragment_separator_only_after_a_record():
    assert serialize_append_fragment([DOG], FieldOrder.desc_first, prefix_ends_with_record=True) == (
        ', {"desc": "dog", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}]}'
    )
    assert serialize_append_fragment([DOG], FieldOrder.desc_first, prefix_ends_with_record=False) == (
        '{"desc": "dog", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}]}'
    )
    assert serialize_append_fragment([], FieldOrder.desc_first, prefix_ends_with_record=True) == "]}"
    assert serialize_append_fragment([], FieldOrder.geometry_first, prefix_ends_with_record=False) == "]}"


def test_append_fragment_plus_prefix_is_the_document():
    prefix = '{"objects": [' + serialize_record(DOG, "desc_first")
    assert prefix + serialize_append_fragment([CAT], "desc_first", prefix_ends_with_record=True) == (
        serialize_objects([DOG, CAT], "desc_first")
    )


@pytest.mark.parametrize("order", list(FieldOrder))
def test_rendered_spans_point_at_desc_content_and_coord_literals(order):
    rendered = render_records([CAT, CoordObject('q"x', (9, 8, 10, 999))], order, lead="[", tail="]")
    first, second = rendered.records
    text = rendered.text
    assert text[first.desc_span[0] : first.desc_span[1]] == "cat"
    assert text[second.desc_span[0] : second.desc_span[1]] == 'q\\"x'
    assert [text[s:e] for s, e in second.coord_spans] == [
        "<|coord_9|>",
        "<|coord_8|>",
        "<|coord_10|>",
        "<|coord_999|>",
    ]
    assert text[first.span[0]] == "{" and text[first.span[1] - 1] == "}"
    assert text[first.span[1] : second.span[0]] == ", "


@pytest.mark.parametrize(
    "desc, bbox",
    [
        ("", (0, 0, 1, 1)),
        ("  ", (0, 0, 1, 1)),
        (3, (0, 0, 1, 1)),
        ("a", (0, 0, 1)),
        ("a", (2, 0, 1, 1)),
        ("a", (0, 2, 1, 1)),
        ("a", (0, 0, 1, 1000)),
        ("a", (0, 0, 1.0, 1)),
        ("a", (0, 0, True, 1)),
    ],
)
def test_coord_object_rejects_invalid_gt(desc, bbox):
    with pytest.raises(ValueError):
        CoordObject(desc, bbox)


def test_field_order_accepts_config_strings():
    assert FieldOrder("desc_first").keys == ("desc", "bbox_2d")
    assert FieldOrder("geometry_first").keys == ("bbox_2d", "desc")
    with pytest.raises(ValueError):
        FieldOrder("desc_last")
