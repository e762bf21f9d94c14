"""What starts a record: the one definition the parser and the repeat-terminate object cap share.

A **record start** is ``{``, then any JSON whitespace (space, tab, LF, CR), then a record key as a whole
JSON string: ``"desc"`` (desc-first records) or ``"bbox_2d"`` (geometry-first records). Both field orders
count: the order is checked later, per record (``order_violation``). ``{"description"`` or ``{"bbox"`` is
no record start; nor is ``{\\"desc\\"`` (escaped, inside a string).

- The parser (``parse_rollout``) reports ``record_starts``: the elements of the objects array (complete,
  or the unfinished one at the end) that begin with a record start (:meth:`RecordStartAutomaton.starts_at`).
- The object cap (``rollout_matching.repeat_terminate.max_object_keys``) counts record starts in the
  generated text, token by token (:class:`RecordStartCounter`), so a looping model is stopped whatever
  whitespace it writes between ``{`` and the key, and however the tokenizer merges those characters.

Both run this module's automaton; for text inside the grammar (a container of records, any JSON whitespace
between tokens, either key order, cut anywhere) the two counts are equal (property test in
``tests/unit/test_record_start.py``). Outside it they can differ: the cap also counts a record start the
model writes before the container or nested in a value, which the parser does not take as a record.

Pure: no torch, transformers or vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from coordexp.protocol import BBOX_KEY, DESC_KEY

#: The whitespace JSON allows between tokens (RFC 8259); the parser's lexer uses exactly these.
JSON_WHITESPACE = " \t\n\r"
#: Keys that may come first in a record (desc-first and geometry-first).
RECORD_START_KEYS: tuple[str, ...] = (DESC_KEY, BBOX_KEY)

_ROOT, _AFTER_BRACE = 0, 1


class RecordStartAutomaton:
    """Character automaton of ``{`` JSON-whitespace* ``"<key>"``; counts the positions where one ends.

    States: 0 (nothing pending), 1 (after ``{`` and whitespace), then one state per character of the quoted
    keys (a trie). A character that does not continue the pending start goes back to 0, or to 1 if it is
    ``{`` (no key contains ``{``, so no other partial match can be pending).
    """

    def __init__(self, keys: Sequence[str] = RECORD_START_KEYS, whitespace: str = JSON_WHITESPACE):
        self.keys = tuple(keys)
        self._next: list[dict[str, int]] = [{"{": _AFTER_BRACE}, {c: _AFTER_BRACE for c in whitespace}]
        self._accept: set[int] = set()
        for key in self.keys:
            if not key or any(c in '{"\\' for c in key):
                raise ValueError(f"record key {key!r} must be non-empty, without '{{', '\"' or '\\\\'")
            state = _AFTER_BRACE
            for c in f'"{key}"':
                nxt = self._next[state].get(c)
                if nxt is None:
                    self._next.append({})
                    nxt = len(self._next) - 1
                    self._next[state][c] = nxt
                state = nxt
            self._accept.add(state)
        self._next[_AFTER_BRACE]["{"] = _AFTER_BRACE
        self.num_states = len(self._next)

    def feed(self, state: int, text: str) -> tuple[int, int]:
        """Run ``text`` from ``state``: (new state, record starts completed in ``text``)."""
        hits = 0
        nxt, accept = self._next, self._accept
        for c in text:
            state = nxt[state].get(c, _AFTER_BRACE if c == "{" else _ROOT)
            if state in accept:
                hits += 1
                state = _ROOT
        return state, hits

    def count(self, text: str) -> int:
        """Record starts in ``text``."""
        return self.feed(_ROOT, text)[1]

    def starts_at(self, text: str, pos: int) -> bool:
        """Does a record start begin at ``text[pos]``?"""
        if not text.startswith("{", pos):
            return False
        state, nxt = _AFTER_BRACE, self._next
        for i in range(pos + 1, len(text)):
            state = nxt[state].get(text[i], -1)
            if state < 0 or state == _AFTER_BRACE and text[i] == "{":
                return False
            if state in self._accept:
                return True
        return False


RECORD_START = RecordStartAutomaton()


class RecordStartCounter:
    """Record starts over token ids, one step per token (the object cap's counter).

    ``piece_of(id)`` is the token's text decoded alone (``tokenizer.decode([id])``; a U+FFFD for a partial
    multi-byte character is fine: no record start holds one). The effect of a token on each automaton
    state is computed on first use and cached, so a step is one dict lookup; the cache holds at most
    (states x distinct tokens seen) entries.
    """

    __slots__ = ("_cache", "_piece_of", "automaton")

    def __init__(self, piece_of: Callable[[int], str] | Sequence[str],
                 automaton: RecordStartAutomaton = RECORD_START):
        self.automaton = automaton
        self._piece_of = piece_of.__getitem__ if isinstance(piece_of, Sequence) else piece_of
        self._cache: list[dict[int, tuple[int, int]]] = [{} for _ in range(automaton.num_states)]

    def piece(self, token: int) -> str:
        """The token's text as this counter sees it."""
        return self._piece_of(int(token))

    def step(self, state: int, token: int) -> tuple[int, int]:
        """(new state, record starts completed by ``token``)."""
        cached = self._cache[state].get(token)
        if cached is None:
            cached = self._cache[state][token] = self.automaton.feed(state, self._piece_of(int(token)))
        return cached

    def count(self, tokens: Iterable[int]) -> int:
        state, total = _ROOT, 0
        for token in tokens:
            state, hits = self.step(state, token)
            total += hits
        return total
