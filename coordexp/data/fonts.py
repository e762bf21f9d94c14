"""Fonts for the labels drawn on images (``coordexp.data.inspect``, ``coordexp.viz``) and plots: object
descriptions are any Unicode text ("café", "猫"), and Pillow's built-in font draws little beyond ASCII.

:func:`label_font` picks, per label, the first font that has a glyph for every character: DejaVu Sans
(ships with matplotlib: Latin with accents, Greek, Cyrillic and many symbols), then a CJK font of the system
if one is installed (Noto Sans CJK, WenQuanYi, Droid Sans Fallback). Characters no font has are drawn as
DejaVu's missing-glyph box, and :func:`missing_glyphs` names them so the caller can say which fonts to
install. Colour emoji fonts are not used (Pillow draws them at one fixed size only).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

__all__ = ["font_files", "label_font", "missing_glyphs", "missing_glyphs_note", "note_missing_glyphs",
           "plot_font_families"]

#: Common locations of system fonts that cover CJK (Debian/Ubuntu and Fedora/RHEL package paths).
SYSTEM_FALLBACKS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/wqy-zenhei/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
)


@functools.cache
def font_files() -> tuple[str, ...]:
    """The font files labels may use, in order of preference: DejaVu Sans, then installed CJK fallbacks."""
    import matplotlib

    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return tuple(str(p) for p in (dejavu, *map(Path, SYSTEM_FALLBACKS)) if p.is_file())


@functools.cache
def _codepoints(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


def _covers(path: str, text: str) -> bool:
    have = _codepoints(path)
    return all(ord(c) in have for c in text if not c.isspace())


@functools.cache
def _truetype(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def label_font(size: int, text: str = ""):
    """A Pillow font of ``size`` pixels that draws every character of ``text`` if any known font can (see
    the module docstring); Pillow's default font when no font file is found."""
    files = font_files()
    if not files:
        from PIL import ImageFont

        return ImageFont.load_default(size=size)
    path = next((f for f in files if _covers(f, text)), files[0])
    return _truetype(path, size)


def missing_glyphs(texts: Iterable[str]) -> list[str]:
    """The characters of ``texts`` (sorted, once each) that no font of :func:`font_files` has."""
    files = font_files()
    chars = {c for t in texts for c in t if not c.isspace()}
    return sorted(c for c in chars if not any(ord(c) in _codepoints(f) for f in files))


def missing_glyphs_note(chars: Iterable[str]) -> str:
    """The one note every picture writer prints (once) when labels hold characters no font draws."""
    return (f"note: no installed font draws {' '.join(chars)} (drawn as boxes in the pictures; the text "
            f"itself is exact). For CJK install Noto Sans CJK (Debian/Ubuntu: fonts-noto-cjk)")


_NOTED: set[str] = set()


def note_missing_glyphs(texts: Iterable[str]) -> None:
    """Print :func:`missing_glyphs_note` on stderr for characters of ``texts`` no font draws, each character
    once per process (pictures are written at every eval of a run)."""
    import sys

    new = [c for c in missing_glyphs(texts) if c not in _NOTED]
    if new:
        _NOTED.update(new)
        print(missing_glyphs_note(new), file=sys.stderr, flush=True)


def plot_font_families() -> list[str]:
    """matplotlib ``font.family`` for plots with labels: DejaVu Sans, then the installed fallbacks (matplotlib
    falls back glyph by glyph along the list)."""
    from matplotlib import font_manager

    families = []
    for path in font_files():
        font_manager.fontManager.addfont(path)
        name = font_manager.FontProperties(fname=path).get_name()
        if name not in families:
            families.append(name)
    return families
