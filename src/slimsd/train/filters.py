"""Row selection by metadata (``data_filter``): rules such as ``aesthetic >= 7.5``, ``min(width, height) >= 512``,
``punsafe < 0.1``, ``language == en`` or ``5 <= len(caption) <= 200``, read by a small parser (never ``eval``)
and evaluated per row. A list of rules keeps the rows that pass every rule; each rule's removed rows are counted
in order (rule k counts the rows that passed rules 1..k-1 and fail it), so the counts add up to what the filter
removed.

Grammar, one comparison or a chain of two per rule::

    rule  := expr OP expr [OP expr]        OP: == != < <= > >= in, not in
    expr  := term (('+' | '-') term)*
    term  := unary (('*' | '/') unary)*
    unary := '-' unary | atom
    atom  := NUMBER | 'text' | "text" | true | false | NAME | NAME(expr, ...) | (expr)
    list  := (item, ...) or [item, ...]    (the right side of in / not in)

Functions: min, max, abs, len (characters of a text), words (its whitespace-separated words), lower.
A NAME is a metadata column (matched case-insensitively when only one column matches: LAION's metadata says
``WIDTH``, img2dataset's ``width``); ``caption`` is always the row's caption. On the right of ``==``, ``!=`` and
in a list, a NAME that is no column of the data is text (``language == en``); quote it to make it text always.
A row without a value for a column (absent, null, NaN), or with a value of the wrong kind, fails the rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from slimsd.errors import SlimsdError

OPERATORS = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")
FUNCTIONS = {
    "min": (1, None),
    "max": (1, None),
    "abs": (1, 1),
    "len": (1, 1),
    "words": (1, 1),
    "lower": (1, 1),
}
CAPTION = "caption"  # the row's caption, whatever column or file it came from
EXAMPLE = "e.g. 'aesthetic >= 7.5' or 'min(width, height) >= 512'"
MISSING = object()  # no usable value: the comparison fails
_OP_CHARS = "<>=!~"
_TOKEN = re.compile(
    r"\s*(?:(?P<num>[0-9.][0-9A-Za-z_.]*(?:(?<=[eE])[+-][0-9]+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_.]*)"
    r"|(?P<str>'[^']*'|\"[^\"]*\")|(?P<op>[<>=!~]+)|(?P<punct>[-+*/(),\[\]]))"
)


class FilterError(SlimsdError):
    """A rule that cannot be read, or that names a column the data lacks (one line, exit 2)."""


@dataclass
class Rule:
    text: str  # as written (stripped): the rule's name in counts and records
    parts: list  # [(left, op, right), ...]: one per comparison of a chain
    names: set  # the column names it reads (as written)


# --- parsing ----------------------------------------------------------------------------------------------------


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            bad = text[pos:].strip()[0]
            raise FilterError(f"filter rule {text!r}: unexpected character {bad!r}; {EXAMPLE}")
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "num":
            try:
                value = float(value)
            except ValueError:
                raise FilterError(f"filter rule {text!r}: {value!r} is not a number") from None
        elif kind == "op" and value not in OPERATORS:
            raise FilterError(
                f"filter rule {text!r}: unknown operator {value!r}; allowed: {', '.join(OPERATORS)}"
            )
        elif kind == "name" and value in ("in", "not"):
            kind = "op"
        out.append((kind, value))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i = text, _tokens(text), 0

    def error(self, problem: str) -> FilterError:
        return FilterError(f"filter rule {self.text!r}: {problem}")

    def peek(self) -> tuple[str, object] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value=None):
        tok = self.peek()
        if tok is None:
            raise self.error(f"ends early; {EXAMPLE}")
        if value is not None and tok[1] != value:
            raise self.error(f"expected {value!r}, found {tok[1]!r}")
        self.i += 1
        return tok

    def rule(self) -> list:
        first = self.expr()
        parts, left = [], first
        while self.peek() is not None:
            tok = self.take()
            if tok[0] != "op":
                raise self.error(f"expected an operator ({', '.join(OPERATORS)}), found {tok[1]!r}")
            op = tok[1]
            if op == "not":
                self.take("in")
                op = "not in"
            right = self.items() if op in ("in", "not in") else self.expr()
            parts.append((left, op, right))
            left = right
        if not parts:
            raise self.error(f"has no comparison ({', '.join(OPERATORS)}); {EXAMPLE}")
        if len(parts) > 2:
            raise self.error("chains more than two comparisons; write one rule per comparison")
        if any(op in ("in", "not in") for _, op, _ in parts[:-1]):
            raise self.error("'in' takes a list on its right and ends the rule")
        return parts

    def items(self) -> tuple:
        tok = self.take()
        close = {"(": ")", "[": "]"}.get(tok[1])
        if tok[0] != "punct" or close is None:
            raise self.error("'in' needs a list on its right, e.g. language in (en, de)")
        values = []
        while True:
            kind, value = self.take()
            if kind == "num":
                values.append(("num", value))
            elif kind == "str":
                values.append(("text", value[1:-1]))
            elif kind == "name":
                values.append(("word", value))
            else:
                raise self.error(f"a list holds numbers and words, found {value!r}")
            sep = self.take()
            if sep[1] == close:
                return ("list", values)
            if sep[1] != ",":
                raise self.error(f"expected ',' or {close!r} in the list, found {sep[1]!r}")

    def expr(self):
        node = self.term()
        while self.peek() in (("punct", "+"), ("punct", "-")):
            node = ("bin", self.take()[1], node, self.term())
        return node

    def term(self):
        node = self.unary()
        while self.peek() in (("punct", "*"), ("punct", "/")):
            node = ("bin", self.take()[1], node, self.unary())
        return node

    def unary(self):
        if self.peek() == ("punct", "-"):
            self.take()
            return ("neg", self.unary())
        return self.atom()

    def atom(self):
        kind, value = self.take()
        if kind == "num":
            return ("num", value)
        if kind == "str":
            return ("text", value[1:-1])
        if kind == "name" and value in ("true", "false"):
            return ("bool", value == "true")
        if kind == "name" and self.peek() == ("punct", "("):
            if value not in FUNCTIONS:
                raise self.error(f"unknown function {value!r}; allowed: {', '.join(FUNCTIONS)}")
            self.take("(")
            args = [self.expr()]
            while self.peek() == ("punct", ","):
                self.take()
                args.append(self.expr())
            self.take(")")
            lo, hi = FUNCTIONS[value]
            if len(args) < lo or (hi is not None and len(args) > hi):
                raise self.error(f"{value}() takes {lo if hi == lo else f'{lo} or more'} argument(s)")
            return ("call", value, args)
        if kind == "name":
            return ("name", value)
        if (kind, value) == ("punct", "("):
            node = self.expr()
            self.take(")")
            return node
        raise self.error(f"unexpected {value!r}; {EXAMPLE}")


def _names(node, text_side: bool = False) -> set:
    """The column names a node reads; on a text side (right of ==, != or in) a bare word may be text."""
    kind = node[0]
    if kind == "name":
        return set() if text_side else {node[1]}
    if kind == "call":
        return set().union(*(_names(a) for a in node[2]))
    if kind == "bin":
        return _names(node[2]) | _names(node[3])
    if kind == "neg":
        return _names(node[1])
    return set()


def parse_rule(text: str) -> Rule:
    if not isinstance(text, str) or not text.strip():
        raise FilterError(f"filter rule {str(text or '').strip()!r}: empty; {EXAMPLE}")
    text = text.strip()
    parts = _Parser(text).rule()
    names = set()
    for left, op, right in parts:
        names |= _names(left) | _names(right, text_side=op in ("==", "!=", "in", "not in"))
    if not names:
        raise FilterError(f"filter rule {text!r}: reads no column; {EXAMPLE}")
    return Rule(text, parts, names)


def parse_rules(rules) -> list[Rule]:
    """``data_filter`` (a list of rule texts, or one text) as rules; a bad one is a one-line error."""
    if rules is None:
        return []
    if isinstance(rules, str):
        rules = [rules]
    return [parse_rule(r) for r in rules]


def normalize(rules) -> list[str] | None:
    """The config's ``data_filter``: each rule checked and stripped; no rules is None (no filter)."""
    parsed = parse_rules(rules)
    return [r.text for r in parsed] or None


def add_rules(values: dict, rules: tuple | list) -> dict:
    """Config values with the command line's ``--filter`` rules after the config's own ``data_filter``."""
    if not rules:
        return values
    have = values.get("data_filter") or []
    return values | {"data_filter": ([have] if isinstance(have, str) else list(have)) + list(rules)}


# --- columns ----------------------------------------------------------------------------------------------------


def resolve(name: str, columns) -> str | None:
    """The data's column for ``name``: the same name, else the one column that matches ignoring case."""
    if name in columns:
        return name
    folded = [c for c in columns if c.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def wanted(rules: list[Rule]) -> set[str]:
    """The casefolded names the rules may read (what an index keeps of each row's metadata)."""
    out = set()
    for rule in rules:
        for left, _, right in rule.parts:
            for node in (left, right):
                out |= {n.casefold() for n in _names(node)} | {n.casefold() for n in _words(node)}
    return out


def _words(node) -> set:
    if node[0] == "name":
        return {node[1]}
    if node[0] == "list":
        return {v for k, v in node[1] if k == "word"}
    return set()


# --- evaluation -------------------------------------------------------------------------------------------------


def _num(v):
    if isinstance(v, bool) or v is MISSING:
        return MISSING
    if isinstance(v, int | float):
        return MISSING if isinstance(v, float) and math.isnan(v) else float(v)
    if isinstance(v, str):  # a number written as text (some JSON sidecars)
        try:
            f = float(v)
        except ValueError:
            return MISSING
        return MISSING if math.isnan(f) else f
    return MISSING


def _call(name: str, args: list):
    if name in ("min", "max"):
        nums = [_num(a) for a in args]
        return MISSING if MISSING in nums else (min if name == "min" else max)(nums)
    (a,) = args
    if name == "abs":
        n = _num(a)
        return MISSING if n is MISSING else abs(n)
    if not isinstance(a, str):
        return MISSING
    return {"len": len, "words": lambda s: len(s.split()), "lower": str.lower}[name](a)


def _arith(op: str, a, b):
    a, b = _num(a), _num(b)
    if a is MISSING or b is MISSING or (op == "/" and b == 0):
        return MISSING
    return {"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else a / b


def _equal(a, b):
    """==: booleans with booleans, numbers with numbers (a number written as text counts), text with text."""
    if a is MISSING or b is MISSING:
        return MISSING
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b if isinstance(a, bool) and isinstance(b, bool) else MISSING
    if isinstance(a, int | float) or isinstance(b, int | float):
        na, nb = _num(a), _num(b)
        return MISSING if na is MISSING or nb is MISSING else na == nb
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return MISSING


def _compare(op: str, a, b):
    """True, False, or MISSING (no usable value: the row fails and is counted as such)."""
    if op in ("in", "not in"):
        found = [_equal(a, v) for v in b]
        if all(f is MISSING for f in found):
            return MISSING
        return any(f is True for f in found) == (op == "in")
    if op in ("==", "!="):
        eq = _equal(a, b)
        return eq if eq is MISSING or op == "==" else not eq
    na, nb = _num(a), _num(b)
    if na is MISSING or nb is MISSING:
        return MISSING
    return {"<": na < nb, "<=": na <= nb, ">": na > nb, ">=": na >= nb}[op]


def _compile(node, columns, text_side: bool, rule: Rule, spec: str) -> Callable[[dict], object]:
    kind = node[0]
    if kind in ("num", "text", "bool"):
        value = node[1]
        return lambda row: value
    if kind in ("name", "word"):
        column = CAPTION if node[1] == CAPTION else resolve(node[1], columns)
        if column is None and (text_side or kind == "word"):
            value = node[1]  # a bare word where text may stand: `language == en`
            return lambda row: value
        if column is None:
            raise missing_column(rule, node[1], columns, spec)

        def get(row):
            v = row.get(column)
            return MISSING if v is None else v

        return get
    if kind == "list":
        items = [_compile(v, columns, True, rule, spec) for v in node[1]]
        return lambda row: [f(row) for f in items]
    if kind == "neg":
        inner = _compile(node[1], columns, False, rule, spec)
        return lambda row: _arith("-", 0.0, inner(row))
    if kind == "bin":
        op, a, b = (
            node[1],
            _compile(node[2], columns, False, rule, spec),
            _compile(node[3], columns, False, rule, spec),
        )
        return lambda row: _arith(op, a(row), b(row))
    name, args = node[1], [_compile(a, columns, False, rule, spec) for a in node[2]]
    return lambda row: _call(name, [f(row) for f in args])


def missing_column(rule: Rule, name: str, columns, spec: str) -> FilterError:
    folded = [c for c in columns if c.casefold() == name.casefold()]
    if len(folded) > 1:
        return FilterError(
            f"filter rule {rule.text!r}: data {spec!r} has several columns named {name!r} but for case "
            f"({', '.join(folded)}); write one of them exactly"
        )
    return FilterError(
        f"filter rule {rule.text!r}: data {spec!r} has no column {name!r}; it has: "
        f"{', '.join(sorted(set(columns) | {CAPTION}))}"
    )


def bind(rule: Rule, columns, spec: str) -> Callable[[dict], object]:
    """The rule as a test of one row's metadata (a dict): True, False, or MISSING. A column the data lacks is a
    one-line error that names it and the columns the data has."""
    tests = []
    for left, op, right in rule.parts:
        text = op in ("==", "!=", "in", "not in")
        tests.append(
            (
                op,
                _compile(left, columns, False, rule, spec),
                _compile(right, columns, text, rule, spec),
            )
        )

    def test(row: dict):
        verdict = True
        for op, left, right in tests:
            v = _compare(op, left(row), right(row))
            if v is MISSING:
                return MISSING
            verdict = verdict and v
        return verdict

    return test


def select(rules: list[Rule], metas: list[dict], columns, spec: str) -> tuple[list[int], list[dict]]:
    """The indices of the rows that pass every rule, and per rule (in order) how many rows it removed and how
    many of those had no usable value: [{"rule", "removed", "no_value", "left"}]."""
    tests = [bind(r, columns, spec) for r in rules]  # every rule's columns checked before any row is read
    kept = list(range(len(metas)))
    report = []
    for rule, test in zip(rules, tests, strict=True):
        left, no_value = [], 0
        for i in kept:
            v = test(metas[i])
            if v is True:
                left.append(i)
            elif v is MISSING:
                no_value += 1
        report.append(
            {"rule": rule.text, "removed": len(kept) - len(left), "no_value": no_value, "left": len(left)}
        )
        kept = left
    return kept, report
