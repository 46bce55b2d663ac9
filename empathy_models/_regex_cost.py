"""
How the time Python's ``re`` takes to search a string with a pattern can grow, read
from the pattern.

Structured output checks an answer against the ``pattern`` and ``patternProperties`` of
its schema with ``re.search``, and the answer is text the model wrote, which a prompt
can steer.  ``re`` backtracks, holds the GIL and has no timeout (a thread cannot stop
it, and a signal would be the application's), so ``^(a+)+$`` searched in
``"a" * 40 + "!"`` stops the event loop for hours.  `pattern_cost` reads each pattern
once, with Python's own parser (``re._parser``, in 3.11 to 3.13; ``sre_parse`` where
that is all there is), and says how the time to search a string of length *n* can grow:

* **exponentially**: a repetition whose body, or whose successive iterations, can match
  the same text in more than one way (``(a+)+``, ``(\\w+\\s?)*``, ``(a|aa)*``,
  ``(\\w|ab)+``), followed by something that can fail (``$``, a character), so that a
  near miss makes ``re`` try every way; or more than 2 ** `_MAX_DOUBLINGS` ways for
  one text without a repetition (``(ab|\\wb){16}``).  Refused, naming the repetition.
  A bounded repetition of a group counts as unbounded (``(a{1,3}){1,10}`` is refused:
  its cost is bounded, but by a large number); a possessive repetition (``\\w++``) or
  an atomic group (``(?>\\w+)``) of one character class, which ``re`` never
  backtracks into, does not count.  (A branch of single characters is one set to the
  parser: ``(\\w|\\d)+`` is safe.)
* **as a power of n**: *n* ** 2 for ``\\d+\\d+$`` and ``\\w+@`` (``re.search`` tries
  every start, and from each scans on), *n* ** 3 for ``^\\s*(.*?)\\s*$``.  The
  exponent is an upper bound: repetitions in a row that can take the same text raise
  it by one each (Weber and Seidl's IDA, checked on three walks), and so does a
  pattern not anchored with ``^`` or ``\\A``.  Over `MAX_EXPONENT`: refused.  Else
  the checker searches a string only up to `length_limit` characters, and the strings
  of one answer share `MATCH_BUDGET`.
* **linearly**: everything else (``^[a-z]+$``, ``\\d{3}-\\d{4}``, ``^(foo|bar)+$``),
  searched in strings of any length.

Refusing (rather than matching with a bounded cost) is the choice because the schema is
the developer's, known before any call: a refused pattern fails the first test run with
the path and the repetition to rewrite, while a bounded matcher would be a second regex
engine whose verdicts must equal ``re``'s on every pattern.  Bounding the length is
kept for the polynomial patterns, which are common and mostly harmless (the email
pattern is quadratic), and whose time a length does bound.

The analysis builds the automaton ``re`` walks (each repetition a loop, ``{m,n}`` of one
character set unrolled, lookarounds and atomic groups read on their own), merges the
states that go on the same way, and looks for two different walks over the same text
(the ambiguity criteria of Weber and Seidl, as Weideman et al. apply them to
backtracking matchers), only among states from which the search can still fail (a walk
that reaches the pattern's end has matched).  Character sets are compared on the
characters the pattern names, their neighbours and other cases, where each of ``\\d``,
``\\w`` and ``\\s`` starts and ends inside its ranges, and a sample of each beyond ASCII,
so ``\\d`` and ``[\\u06f0-\\u06f9]``, or ``k`` and the Kelvin sign ignoring case, are
seen to overlap.  A pattern the parser reads into something unknown (a future Python),
or a Python without the parser, counts as `UNKNOWN_EXPONENT`: not refused, and searched
in short strings only.
"""

from __future__ import annotations

import functools
import importlib
import re
import warnings
from collections.abc import Callable
from typing import Any, Final

__all__ = ["MATCH_BUDGET", "MAX_EXPONENT", "UNKNOWN_EXPONENT", "length_limit", "pattern_cost"]

MATCH_BUDGET: Final = 10_000_000
"""
For one answer, the sum over its strings searched with a pattern whose time grows faster
than linearly of *length* ** *exponent*: about 0.1 s of ``re`` at its worst.
"""
MAX_EXPONENT: Final = 3
"""A pattern whose search time can grow faster than the cube of the length is refused."""
UNKNOWN_EXPONENT: Final = MAX_EXPONENT
"""The exponent a pattern the parser cannot read counts as."""

_MAX_STEPS: Final = 400_000
"""Steps of analysis for one pattern: a pattern that needs more is refused as too complex."""
_MAX_NODES: Final = 20_000
_UNROLL_CHARS: Final = 64
"""``x{m,n}`` of one character class is unrolled up to this ``n``; a loop beyond."""
_UNROLL_GROUPS: Final = 16
"""``(...){m}`` is unrolled up to this ``m``; a loop beyond."""
_MAX_DOUBLINGS: Final = 12
"""A pattern where some text has more than 2 ** 12 ways to match is refused."""
_FLAGS_CHAR: Final = re.IGNORECASE | re.DOTALL | re.ASCII | re.UNICODE
_SAMPLE: Final = (
    "".join(map(chr, range(128)))
    + "\x85\xa0\xaa\xb2\xb5\xba\xbc\xc0\xdf\xe9\xff\u0130\u0131\u017f\u01c5\u0345\u0390"
    + "\u03a9\u03c2\u03f4\u0416\u0660\u06f0\u07c0\u0966\u1680\u1e9e\u2000\u200b\u2028"
    + "\u2029\u202f\u205f\u2126\u212a\u212b\u2160\u3000\u3042\u4e2d\ufb00\ufeff\uffff"
    + "\U0001d7ce\U0001f600\U0010ffff\ud800"
)
"""Characters every pattern's analysis looks at: ASCII, and some of each class beyond."""
_CATEGORIES: Final = {
    "CATEGORY_DIGIT": r"\d",
    "CATEGORY_NOT_DIGIT": r"\D",
    "CATEGORY_WORD": r"\w",
    "CATEGORY_NOT_WORD": r"\W",
    "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S",
}
_CHAR_OPS: Final = frozenset({"LITERAL", "NOT_LITERAL", "ANY", "IN"})
_REPEATS: Final = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})
_ANCHORS: Final = {
    "AT_BEGINNING": "^",
    "AT_BEGINNING_STRING": r"\A",
    "AT_END": "$",
    "AT_END_STRING": r"\Z",
    "AT_BOUNDARY": r"\b",
    "AT_NON_BOUNDARY": r"\B",
}


def _load_parser() -> Any:
    for name in ("re._parser", "sre_parse"):  # sre_parse: the name before 3.11, deprecated
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "parse", None)):
            return module
    return None


_PARSER: Any = _load_parser()
_MAXREPEAT: Final[int] = int(getattr(_PARSER, "MAXREPEAT", 2**32 - 1))


class _Unknown(Exception):
    """The parsed pattern holds something this module does not read."""


class _TooComplex(Exception):
    """The analysis would take more than `_MAX_STEPS` steps."""


def length_limit(exponent: int) -> int:
    """The longest string a pattern of ``exponent`` is searched in, alone in an answer."""
    if exponent < 2:
        return 2**63
    limit = int(MATCH_BUDGET ** (1 / exponent))
    while (limit + 1) ** exponent <= MATCH_BUDGET:
        limit += 1
    while limit**exponent > MATCH_BUDGET:
        limit -= 1
    return limit


@functools.lru_cache(maxsize=1024)
def pattern_cost(pattern: str) -> tuple[int, str | None]:
    """
    ``(exponent, None)`` for a pattern that compiles, its search time in a string of
    length *n* growing at most as *n* ** ``exponent`` (1: linearly); or ``(0, why)`` to
    refuse it, ``why`` a phrase to follow the pattern in a message ("... can take ...").
    """
    if _PARSER is None:
        return UNKNOWN_EXPONENT, None
    try:
        parsed = _PARSER.parse(pattern)
        data, flags = list(parsed.data), int(parsed.state.flags)
    except Exception:  # a pattern that does not compile: refused elsewhere
        return UNKNOWN_EXPONENT, None
    try:
        graph = _Graph(_Work(_Chars(data)))
        graph.end(graph.seq(data, graph.start, flags, ()))
        exponent, why = _measure(graph)
    except _Unknown:
        return UNKNOWN_EXPONENT, None
    except (_TooComplex, RecursionError):
        return 0, (
            "is too large for the check against slow matching (which stops after "
            f"{_MAX_STEPS:,} steps): simplify it or split it"
        )
    if why is not None:
        return 0, _exponential(pattern, flags, why)
    unanchored = exponent > 0 and not graph.anchored()
    exponent = max(1, exponent + unanchored)
    if exponent > MAX_EXPONENT:
        return 0, (
            f"can take time growing as the length of the string to the power {exponent}: "
            "repetitions that can match the same text follow one another"
            + (" (and it is not anchored with '^')" if unanchored else "")
            + "; rewrite it so a repetition cannot take what the next one takes (e.g. "
            "'[^,]*,' for '.*?,')"
        )
    return exponent, None


def _exponential(pattern: str, flags: int, why: tuple[str, Any]) -> str:
    kind, what = why
    if kind == "ways":
        return (
            f"can take time exponential in its size: some text has over 2**{what} ways to "
            f"match it ({what} times in a row a part can match the same text two ways), "
            "and re tries every way on a string that almost matches; rewrite it so the "
            "text matches one way"
        )
    return (
        f"can take time exponential in the length of the string: "
        f"{_culprit_text(pattern, flags, what)} repeats a part that can match the same "
        "text in more than one way, and re tries every way on a string that almost "
        "matches; rewrite it so the text matches one way (e.g. 'a+' for '(a+)+', "
        r"'\\w+(\\s\\w+)*' for '(\\w+\\s?)*'), or make the repetition possessive "
        r"('\\w++') or atomic ('(?>\\w+)')"
    )


# --------------------------------------------------------------------------- characters


def _char(code: int) -> str:
    return f"\\U{code:08x}"


def _set_source(op: str, arg: Any) -> str:
    """A pattern matching one character as ``(op, arg)`` does (with the same flags)."""
    text, parts = _set_text(op, arg, _char, _unknown_item)
    if parts is None:
        return text
    return f"[{text}]" if parts else "[^\\s\\S]"


def _unknown_item(name: str, item: Any) -> str:
    raise _Unknown(name)


def _set_text(
    op: str,
    arg: Any,
    char: Callable[[int], str],
    unknown: Callable[[str, Any], str],
) -> tuple[str, int | None]:
    """
    ``(op, arg)``, a one-character item, written with ``char`` for each code point: the
    text and, for a set (``IN``), its number of parts (``None`` otherwise, the text then
    whole); an item of a set it cannot write is ``unknown(name, item)``'s.
    """
    if op == "LITERAL":
        return char(arg), None
    if op == "NOT_LITERAL":
        return f"[^{char(arg)}]", None
    if op == "ANY":
        return ".", None
    parts: list[str] = []
    for item_op, item in arg:
        name = str(item_op)
        if name == "NEGATE":
            parts.insert(0, "^")
        elif name == "LITERAL":
            parts.append(char(item))
        elif name == "RANGE":
            parts.append(f"{char(item[0])}-{char(item[1])}")
        elif name == "CATEGORY" and str(item) in _CATEGORIES:
            parts.append(_CATEGORIES[str(item)])
        else:
            parts.append(unknown(name, item))
    return "".join(parts), len(parts)


def _children(op: str, arg: Any) -> list[Any]:
    """The parsed sequences inside the item ``(op, arg)``."""
    if op == "SUBPATTERN":
        return [arg[-1]]
    if op == "BRANCH":
        return list(arg[1])
    if op in _REPEATS:
        return [arg[2]]
    if op in ("ASSERT", "ASSERT_NOT"):
        return [arg[1]]
    if op == "ATOMIC_GROUP":
        return [arg]
    if op == "GROUPREF_EXISTS":
        return [seq for seq in arg[1:] if seq is not None]
    return []


class _Chars:
    """The characters one pattern's analysis compares sets on, and each set as a bit mask."""

    def __init__(self, data: list[Any]) -> None:
        codes: set[int] = set(map(ord, _SAMPLE))
        todo = [data]
        while todo:
            for op, arg in todo.pop():
                name = str(op)
                if name in ("LITERAL", "NOT_LITERAL"):
                    self._near(codes, arg)
                elif name == "IN":
                    for item_op, item in arg:
                        if str(item_op) == "LITERAL":
                            self._near(codes, item)
                        elif str(item_op) == "RANGE":
                            self._range(codes, *item)
                todo.extend(_children(name, arg))
        self.text = "".join(map(chr, sorted(codes)))
        self.masks: dict[tuple[str, int], int] = {}

    @staticmethod
    def _near(codes: set[int], code: int) -> None:
        for near in (code - 1, code, code + 1):
            if 0 <= near <= 0x10FFFF:
                codes.add(near)
                char = chr(near)
                for other in (char.lower(), char.upper(), char.casefold(), char.title()):
                    if len(other) == 1:
                        codes.add(ord(other))

    def _range(self, codes: set[int], low: int, high: int) -> None:
        self._near(codes, low)
        self._near(codes, high)
        if high - low <= 4096:  # where each class starts and ends inside it
            text = "".join(map(chr, range(low, high + 1)))
            for found in re.finditer(r"\d+|\D+", text):
                codes.update((low + found.start(), low + found.end() - 1))
            for found in re.finditer(r"\w+|\W+", text):
                codes.update((low + found.start(), low + found.end() - 1))
            for found in re.finditer(r"\s+|\S+", text):
                codes.update((low + found.start(), low + found.end() - 1))

    def mask(self, op: str, arg: Any, flags: int) -> int:
        key = (_set_source(op, arg), flags & _FLAGS_CHAR)
        mask = self.masks.get(key)
        if mask is None:
            mask = 0
            for found in re.finditer(key[0], self.text, key[1]):
                mask |= 1 << found.start()
            self.masks[key] = mask
        return mask

    @property
    def everything(self) -> int:
        return (1 << len(self.text)) - 1


# --------------------------------------------------------------------------- the automaton

_ATOM, _PASS, _TEST, _END = range(4)
"""Node kinds: consumes one character; passes; passes if a test holds; the match ends."""


class _Work:
    """What one pattern's analysis shares: its characters and its steps."""

    def __init__(self, chars: _Chars) -> None:
        self.chars = chars
        self.steps = 0
        self.checks = _MAX_STEPS // 4  # for `_three_ways`, which may stop short

    def tick(self, steps: int = 1) -> None:
        self.steps += steps
        if self.steps > _MAX_STEPS:
            raise _TooComplex


class _Graph:
    """The automaton ``re`` walks for a parsed pattern, loops marked (Thompson's shape)."""

    def __init__(self, work: _Work) -> None:
        self.work = work
        self.kind: list[int] = []
        self.links: list[list[tuple[int, int, int]]] = []  # (node, loop or -1, barred mask)
        self.mask: list[int] = []
        self.after: list[int] = []  # for a character node, the node after it
        self.loops: list[tuple[Any, int]] = []  # each loop: its parsed item and its depth
        self.subs: list[tuple[Any, int, bool]] = []  # lookarounds, atomic groups; once?
        self.begins: set[int] = set()
        self.start = self.new()

    def new(self, kind: int = _PASS) -> int:
        self.kind.append(kind)
        self.links.append([])
        self.mask.append(0)
        self.after.append(-1)
        if len(self.kind) > _MAX_NODES:
            raise _TooComplex
        return len(self.kind) - 1

    def link(self, node: int, target: int, loop: int = -1, barred: int = 0) -> None:
        self.links[node].append((target, loop, barred))

    def end(self, node: int) -> None:
        self.link(node, self.new(_END))

    def char(self, node: int, mask: int) -> int:
        atom = self.new(_ATOM)
        self.link(node, atom)
        self.mask[atom] = mask
        self.after[atom] = self.new()
        return self.after[atom]

    def test(self, node: int, begins: bool = False) -> int:
        test = self.new(_TEST)
        self.link(node, test)
        if begins:
            self.begins.add(test)
        after = self.new()
        self.link(test, after)
        return after

    def seq(self, data: Any, node: int, flags: int, loops: tuple[int, ...]) -> int:
        for op, arg in data:
            node = self.item(str(op), arg, node, flags, loops)
        return node

    def item(self, op: str, arg: Any, node: int, flags: int, loops: tuple[int, ...]) -> int:
        if op in _CHAR_OPS:
            return self.char(node, self.work.chars.mask(op, arg, flags))
        if op == "SUBPATTERN":
            return self.seq(arg[-1], node, (flags | arg[1]) & ~arg[2], loops)
        if op == "BRANCH" or op == "GROUPREF_EXISTS":
            branches = arg[1] if op == "BRANCH" else [arg[1], arg[2] or []]
            out = self.new()
            for branch in branches:
                self.link(self.seq(branch, node, flags, loops), out)
            return out
        if op in _REPEATS:
            return self.repeat(op, arg, node, flags, loops)
        if op == "ATOMIC_GROUP":
            return self.atomic((op, arg), arg, node, flags, loops)
        if op == "AT":
            code = str(arg)
            if code not in _ANCHORS:
                raise _Unknown(code)
            begins = code == "AT_BEGINNING_STRING" or (
                code == "AT_BEGINNING" and not flags & re.MULTILINE
            )
            return self.test(node, begins)
        if op in ("ASSERT", "ASSERT_NOT"):
            self.subs.append((arg[1], flags, not self.loops))
            return self.test(node)
        if op == "GROUPREF":  # the group's text again: counted as any text
            everything = self.work.chars.everything
            return self.loop((op, arg), node, loops, lambda n, _: self.char(n, everything))
        raise _Unknown(op)

    def loop(self, item: Any, node: int, loops: tuple[int, ...], body: Any, bar: int = 0) -> int:
        """``body`` repeated any number of times (``re`` does not repeat an empty match)."""
        number = len(self.loops)
        self.loops.append((item, len(loops)))
        entry = self.new()
        self.link(node, entry)
        first = self.new()
        self.link(entry, first)
        self.link(body(first, (*loops, number)), entry, loop=number)
        out = self.new()
        self.link(entry, out, barred=bar)
        return out

    def optional(self, node: int, body: Any) -> int:
        out = self.new()
        self.link(node, out)
        self.link(body(node), out)
        return out

    def repeat(self, op: str, arg: Any, node: int, flags: int, loops: tuple[int, ...]) -> int:
        low, high, data = arg
        single = _single_set(data, flags)
        if op == "POSSESSIVE_REPEAT" and single is None:
            return self.atomic((op, arg), [(_PARSER.MAX_REPEAT, arg)], node, flags, loops)
        if single is not None:
            mask = self.work.chars.mask(*single)
            if high <= _UNROLL_CHARS or (low <= _UNROLL_CHARS and high >= _MAXREPEAT):
                for _ in range(low):
                    node = self.char(node, mask)
                if high >= _MAXREPEAT:  # possessive: what follows cannot start with it
                    bar = mask if op == "POSSESSIVE_REPEAT" else 0
                    return self.loop((op, arg), node, loops, lambda n, _: self.char(n, mask), bar)
                return self.nested(node, mask, high - low)
        copies = low if low <= _UNROLL_GROUPS else 1
        for _ in range(copies):
            node = self.seq(data, node, flags, loops)
        if high == copies:
            return node
        if high == copies + 1:
            return self.optional(node, lambda n: self.seq(data, n, flags, loops))
        return self.loop((op, arg), node, loops, lambda n, inner: self.seq(data, n, flags, inner))

    def nested(self, node: int, mask: int, count: int) -> int:
        """``(x(x(x)?)?)?``: up to ``count`` characters of ``mask``, one way for each."""
        outs = []
        for _ in range(count):
            outs.append(node)
            node = self.char(node, mask)
        for skipped in outs:
            self.link(skipped, node)
        return node

    def atomic(self, item: Any, data: Any, node: int, flags: int, loops: tuple[int, ...]) -> int:
        """An atomic group: ``re`` never backtracks into it; read alone, counted as a loop."""
        single = _single_set(data, flags)
        if len(data) == 1 and str(data[0][0]) in ("MAX_REPEAT", "MIN_REPEAT"):
            high, body = data[0][1][1:]
            if high >= _MAXREPEAT and _single_set(body, flags) is not None:
                return self.repeat("POSSESSIVE_REPEAT", data[0][1], node, flags, loops)
        if single is not None:
            return self.char(node, self.work.chars.mask(*single))
        self.subs.append((data, flags, not self.loops))
        union = _union(self.work.chars, data, flags)
        return self.loop(item, node, loops, lambda n, _: self.char(n, union))

    def anchored(self) -> bool:
        """Whether every way into the pattern passes ``^`` (not multiline) or ``\\A``."""
        seen = {self.start}
        todo = [self.start]
        while todo:
            node = todo.pop()
            if self.kind[node] in (_ATOM, _END):
                return False
            for target, _, _ in self.links[node]:
                if target not in seen and target not in self.begins:
                    seen.add(target)
                    todo.append(target)
        return True


def _single_set(data: Any, flags: int) -> tuple[str, Any, int] | None:
    """``(op, arg, flags)`` when ``data`` is one character set, perhaps in a group."""
    while len(data) == 1 and str(data[0][0]) == "SUBPATTERN":
        arg = data[0][1]
        data, flags = arg[-1], (flags | arg[1]) & ~arg[2]
    if len(data) == 1 and str(data[0][0]) in _CHAR_OPS:
        return str(data[0][0]), data[0][1], flags
    return None


def _union(chars: _Chars, data: Any, flags: int) -> int:
    """Every character ``data`` can match (any, when it holds a group reference)."""
    mask = 0
    todo: list[tuple[Any, int]] = [(data, flags)]
    while todo:
        seq, seq_flags = todo.pop()
        for op, arg in seq:
            name = str(op)
            if name in _CHAR_OPS:
                mask |= chars.mask(name, arg, seq_flags)
            elif name == "GROUPREF":
                return chars.everything
            elif name == "SUBPATTERN":
                todo.append((arg[-1], (seq_flags | arg[1]) & ~arg[2]))
            else:
                todo.extend((child, seq_flags) for child in _children(name, arg))
    return mask


# --------------------------------------------------------------------------- ambiguity

_Edge = tuple[int, int, tuple[int, ...]]
"""From a state: the characters (a mask), the state reached, the loops repeated on the way."""


_Way = tuple[int, int, tuple[int, ...]]
"""A way out of a state: the characters, the character node reached (-1: the end), the
tests passed on the way."""


def _closure(graph: _Graph, node: int) -> tuple[list[_Edge], bool, list[_Way]]:
    """
    The edges out of the state at ``node``: one for each way to the next character
    (each loop repeated at most once without a character between, as ``re`` does);
    whether a way ends the match without a test (the state then always succeeds); and
    every way out, with the tests on it.
    """
    found: dict[tuple[int, int], list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    final = False
    out: list[_Way] = []
    todo: list[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = [(node, 0, (), ())]
    while todo:
        at, barred, used, tests = todo.pop()
        graph.work.tick()
        kind = graph.kind[at]
        if kind == _ATOM:
            paths = found.setdefault((at, barred), [])
            if len(paths) < 2:
                paths.append((used, tests))
            continue
        if kind == _END:
            final = final or not tests
            out.append((0, -1, tests))
            continue
        if kind == _TEST:
            tests = (*tests, at)
        for target, loop, bar in graph.links[at]:
            if loop < 0:
                todo.append((target, barred | bar, used, tests))
            elif loop not in used:
                todo.append((target, barred | bar, (*used, loop), tests))
    edges: list[_Edge] = []
    for (atom, barred), paths in found.items():
        mask = graph.mask[atom] & ~barred
        if mask:
            edges.extend((mask, atom, used) for used, _ in paths)
            out.extend((mask, atom, tests) for _, tests in paths)
    return edges, final, out


def _tarjan(succ: list[list[int]]) -> list[int]:
    """The strongly connected component of each node; a component reached from another
    has a smaller number."""
    count = len(succ)
    index = [-1] * count
    low = [0] * count
    comp = [-1] * count
    on_stack = [False] * count
    stack: list[int] = []
    counter = comps = 0
    for root in range(count):
        if index[root] >= 0:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        work = [(root, 0)]
        while work:
            node, i = work[-1]
            if i < len(succ[node]):
                work[-1] = (node, i + 1)
                target = succ[node][i]
                if index[target] < 0:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack[target] = True
                    work.append((target, 0))
                elif on_stack[target]:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                while True:
                    member = stack.pop()
                    on_stack[member] = False
                    comp[member] = comps
                    if member == node:
                        break
                comps += 1
    return comp


class _Automaton:
    """The states of a `_Graph` (its start, and after each character) and their edges."""

    def __init__(self, graph: _Graph) -> None:
        self.graph = graph
        self.atoms = [n for n, kind in enumerate(graph.kind) if kind == _ATOM]
        state_of = {atom: i + 1 for i, atom in enumerate(self.atoms)}
        self.edges: list[list[_Edge]] = []
        self.final: list[bool] = []
        ways: list[list[_Way]] = []
        for node in [graph.start, *(graph.after[a] for a in self.atoms)]:
            edges, final, out = _closure(graph, node)
            self.edges.append([(mask, state_of[atom], used) for mask, atom, used in edges])
            self.final.append(final)
            ways.append([(m, state_of.get(atom, -1), tests) for m, atom, tests in out])
        self.merge(ways)
        reached = {0}
        todo = [0]
        while todo:
            for _, target, _ in self.edges[todo.pop()]:
                if target not in reached:
                    reached.add(target)
                    todo.append(target)
        # the states a search can fail from: a way through a final state succeeds there
        self.failing = [s for s in sorted(reached) if not self.final[s]]

    def merge(self, ways: list[list[_Way]]) -> None:
        """
        Send the edges into a state to one that goes on the same way: after ``(ab|\\wb)``
        the two ``b`` are one state, so two walks meet again there (and ``a`` / ``\\w``
        are two edges to one state: two ways).
        """
        same = list(range(len(self.edges)))
        while True:
            seen: dict[tuple[Any, ...], int] = {}
            changed = False
            for state, out in enumerate(ways):
                self.graph.work.tick(len(out))
                key = tuple(sorted((m, same[t] if t >= 0 else -1, tests) for m, t, tests in out))
                first = seen.setdefault(key, same[state])
                if first != same[state]:
                    same[state] = first
                    changed = True
            if not changed:
                break
        self.edges = [[(m, same[t], used) for m, t, used in edges] for edges in self.edges]
        self.same = same

    def pairs(self) -> tuple[list[tuple[int, int]], list[list[int]], set[tuple[int, int]]]:
        """
        Two walks over the same text from any failing state, both through failing states:
        the pairs of states reached, their successors, and the steps where the walks part
        from one state by two different edges.
        """
        index: dict[tuple[int, int], int] = {}
        nodes: list[tuple[int, int]] = []
        succ: list[list[int]] = []
        parting: set[tuple[int, int]] = set()
        todo: list[int] = []

        def visit(pair: tuple[int, int]) -> int:
            number = index.get(pair)
            if number is None:
                number = index[pair] = len(nodes)
                nodes.append(pair)
                succ.append([])
                todo.append(number)
            return number

        for state in self.failing:
            visit((state, state))
        while todo:
            here = todo.pop()
            one, two = nodes[here]
            for i, (mask_one, to_one, _) in enumerate(self.edges[one]):
                if self.final[to_one]:
                    continue
                self.graph.work.tick(len(self.edges[two]))
                for j, (mask_two, to_two, _) in enumerate(self.edges[two]):
                    if mask_one & mask_two and not self.final[to_two]:
                        there = visit((to_one, to_two))
                        succ[here].append(there)
                        if one == two and i != j:
                            parting.add((here, there))
        return nodes, succ, parting


def _measure(graph: _Graph) -> tuple[int, tuple[str, Any] | None]:
    """
    ``(exponent, None)``: the time of one match attempt grows at most as *n* **
    ``exponent``; or ``(0, why)`` for exponential time: ``("loop", the repetition's parsed
    item or None)`` or ``("ways", how many times the ways double one after another)``.
    """
    once = inner = 0  # the exponents of lookarounds and atomic groups met once, or more
    for data, flags, single in graph.subs:
        sub = _Graph(graph.work)
        sub.end(sub.seq(data, sub.start, flags, ()))
        exponent, why = _measure(sub)
        if why is not None:
            return 0, why
        if single:
            once = max(once, exponent)
        else:
            inner = max(inner, exponent)
    machine = _Automaton(graph)
    nodes, succ, parting = machine.pairs()
    comp = _tarjan(succ)
    members: dict[int, list[int]] = {}
    for node, number in enumerate(comp):
        members.setdefault(number, []).append(node)
    cyclic: set[int] = set()
    for node, targets in enumerate(succ):
        cyclic.update(comp[node] for target in targets if comp[target] == comp[node])
    for number in sorted(cyclic):
        group = members[number]
        if any(nodes[n][0] == nodes[n][1] for n in group) and (
            any(nodes[n][0] != nodes[n][1] for n in group)
            or any((n, t) in parting for n in group for t in succ[n] if comp[t] == number)
        ):
            return 0, ("loop", _culprit(machine, {nodes[n] for n in group}))
    doublings = _doublings(nodes, succ, parting, comp)
    if doublings > _MAX_DOUBLINGS:
        return 0, ("ways", doublings)
    degree = _degree(machine, nodes, [members[n] for n in sorted(cyclic)])
    return max(degree + inner, once), None


def _doublings(
    nodes: list[tuple[int, int]],
    succ: list[list[int]],
    parting: set[tuple[int, int]],
    comp: list[int],
) -> int:
    """
    The most times two walks over the same text part along one walk of the pairs: with
    *k*, some text has 2 ** *k* ways to match (``(ab|a\\w){16}``: 16), and ``re`` tries
    them all on a near miss.  (Pairs on a loop never part: that was refused before.)
    """
    best = [0] * (max(comp, default=-1) + 1)
    order = sorted(range(len(nodes)), key=comp.__getitem__)
    for node in order:  # a pair's successors are in components numbered no higher
        one, two = nodes[node]
        for target in succ[node]:
            if comp[target] == comp[node]:
                continue
            parts = one == two and (
                nodes[target][0] != nodes[target][1] or (node, target) in parting
            )
            best[comp[node]] = max(best[comp[node]], best[comp[target]] + parts)
    return max(best, default=0)


def _degree(machine: _Automaton, nodes: list[tuple[int, int]], loops: list[list[int]]) -> int:
    """
    How many failing loops can follow one another each matching text the one before it
    could have matched (``\\d+\\d+``), plus one; 0 when no loop can fail.
    """
    count = len(machine.edges)
    failing = set(machine.failing)
    succ = [
        [t for _, t, _ in machine.edges[s] if t in failing] if s in failing else []
        for s in range(count)
    ]
    comp = _tarjan(succ)
    if not any(comp[t] == comp[s] for s in failing for t in succ[s]):
        return 0
    reach: dict[int, set[int]] = {}
    for state in sorted(range(count), key=comp.__getitem__):
        mine = reach.setdefault(comp[state], {comp[state]})
        for target in succ[state]:
            mine |= reach.get(comp[target], {comp[target]})
    links: dict[int, set[int]] = {}
    for group in loops:
        for one, two in (nodes[n] for n in group):
            known = links.setdefault(comp[one], set())
            if comp[two] in known or comp[one] == comp[two] or comp[two] not in reach[comp[one]]:
                continue
            if _three_ways(machine, one, two):
                known.add(comp[two])
    longest: dict[int, int] = {}
    for number in sorted(set(comp)):
        longest[number] = max((1 + longest[t] for t in links.get(number, ())), default=0)
    return 1 + max(longest.values(), default=0)


def _three_ways(machine: _Automaton, one: int, two: int) -> bool:
    """
    Whether a text leads from ``one`` back to itself, from ``one`` to ``two`` and from
    ``two`` back to itself, through failing states: then each further repetition of that
    text multiplies the ways by the length (Weber and Seidl's IDA).
    """
    edges, final = machine.edges, machine.final
    work = machine.graph.work
    goal = (one, two, two)
    seen = {(one, one, two)}
    todo = [(one, one, two)]
    while todo:
        first, second, third = todo.pop()
        for mask_one, to_one, _ in edges[first]:
            if final[to_one]:
                continue
            for mask_two, to_two, _ in edges[second]:
                both = mask_one & mask_two
                if not both or final[to_two]:
                    continue
                work.checks -= len(edges[third])
                if work.checks < 0:  # out of time for these: count it, as the pairs suggest
                    return True
                for mask_three, to_three, _ in edges[third]:
                    triple = (to_one, to_two, to_three)
                    if both & mask_three and not final[to_three] and triple not in seen:
                        if triple == goal:
                            return True
                        seen.add(triple)
                        todo.append(triple)
    return False


def _culprit(machine: _Automaton, pairs: set[tuple[int, int]]) -> Any:
    """The outermost repetition repeated on the ambiguous walks (its parsed item)."""
    states = {state for pair in pairs for state in pair}
    used: set[int] = set()
    for state, edges in enumerate(machine.edges):
        if machine.same[state] in states:  # the state, or one sent to it
            for _, target, way in edges:
                if target in states:
                    used.update(way)
    loops = machine.graph.loops
    if not used:
        return None
    return loops[min(used, key=lambda loop: loops[loop][1])][0]


# --------------------------------------------------------------------------- messages


def _unparse_set(op: str, arg: Any) -> str:
    text, parts = _set_text(op, arg, _escaped, lambda name, item: "?")
    if parts is None:
        return text
    return text if len(arg) == 1 and text.startswith("\\") and len(text) == 2 else f"[{text}]"


def _escaped(code: int) -> str:
    return re.escape(chr(code))


def _quantifier(op: str, low: int, high: int) -> str:
    if (low, high) == (0, _MAXREPEAT):
        text = "*"
    elif (low, high) == (1, _MAXREPEAT):
        text = "+"
    elif (low, high) == (0, 1):
        text = "?"
    elif high == _MAXREPEAT:
        text = f"{{{low},}}"
    else:
        text = f"{{{low}}}" if low == high else f"{{{low},{high}}}"
    return text + {"MIN_REPEAT": "?", "POSSESSIVE_REPEAT": "+"}.get(op, "")


def _unparse(data: Any) -> str:
    """A parsed pattern as text again (the parser may have simplified it)."""
    out = []
    for raw_op, arg in data:
        op = str(raw_op)
        if op in _CHAR_OPS:
            out.append(_unparse_set(op, arg))
        elif op == "SUBPATTERN":
            out.append(("(" if arg[0] is not None else "(?:") + _unparse(arg[-1]) + ")")
        elif op == "BRANCH":
            text = "|".join(_unparse(branch) for branch in arg[1])
            out.append(text if len(data) == 1 else f"(?:{text})")
        elif op in _REPEATS:
            body = _unparse(arg[2])
            simple = len(arg[2]) == 1 and str(arg[2][0][0]) in (*_CHAR_OPS, "SUBPATTERN")
            out.append((body if simple else f"(?:{body})") + _quantifier(op, arg[0], arg[1]))
        elif op == "ATOMIC_GROUP":
            out.append(f"(?>{_unparse(arg)})")
        elif op == "AT":
            out.append(_ANCHORS.get(str(arg), ""))
        elif op in ("ASSERT", "ASSERT_NOT"):
            mark = ("" if arg[0] >= 0 else "<") + ("=" if op == "ASSERT" else "!")
            out.append(f"(?{mark}{_unparse(arg[1])})")
        elif op == "GROUPREF":
            out.append(f"\\{arg}")
        elif op == "GROUPREF_EXISTS":
            no = "" if arg[2] is None else "|" + _unparse(arg[2])
            out.append(f"(?({arg[0]}){_unparse(arg[1])}{no})")
    return "".join(out)


_QUANTIFIER: Final = re.compile(r"(?:[*+?]|\{\d*(?:,\d*)?\})[?+]?")


def _group_text(pattern: str, group: int) -> str | None:
    """The text of capturing group ``group`` in ``pattern`` and of the quantifier after it."""
    count = depth = 0
    start = -1
    at = 0
    while at < len(pattern):
        char = pattern[at]
        if char == "\\":
            at += 1
        elif char == "[":
            at += 2 if pattern.startswith(("[]", "[^"), at) else 1
            at += 1 if pattern.startswith("^]", at - 1) and pattern[at - 1] == "^" else 0
            while at < len(pattern) and pattern[at] != "]":
                at += 2 if pattern[at] == "\\" else 1
        elif pattern.startswith("(?#", at):
            at = pattern.find(")", at)
            if at < 0:
                return None
        elif char == "(":
            if start >= 0:
                depth += 1
            elif not pattern.startswith("(?", at) or (
                pattern.startswith(("(?P<", "(?<"), at)
                and not pattern.startswith(("(?<=", "(?<!"), at)
            ):
                count += 1
                if count == group:
                    start, depth = at, 1
        elif char == ")" and start >= 0:
            depth -= 1
            if depth == 0:
                found = _QUANTIFIER.match(pattern, at + 1)
                return pattern[start : found.end() if found else at + 1]
        at += 1
    return None


def _culprit_text(pattern: str, flags: int, item: Any) -> str:
    """The repetition ``item`` as the pattern writes it (else as the parser reads it)."""
    if item is None:
        return "it"
    op, arg = item
    if str(op) in _REPEATS and not flags & re.VERBOSE and len(arg[2]) == 1:
        inner_op, inner = arg[2][0]
        if str(inner_op) == "SUBPATTERN" and inner[0] is not None:
            text = _group_text(pattern, inner[0])
            if text is not None:
                return repr(text)
    return repr(_unparse([item]))
