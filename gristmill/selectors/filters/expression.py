"""Keep records where an expression over their columns holds (row-local selector).

The expression is parsed by a small recursive-descent parser into a tree of
``pyarrow.compute`` calls; nothing is passed to ``eval``, names are columns
only, and the only functions are the ones listed below. Grammar::

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := sum [("<" | "<=" | ">" | ">=" | "==" | "!=") sum
                      | ["not"] "in" "[" literal ("," literal)* "]"
                      | "is" ["not"] "null"]
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/") unary)*
    unary      := "-" unary | atom
    atom       := number | 'string' | "string" | true | false | null
                | column | `any column name` | function "(" expr ")" | "(" expr ")"
    function   := len | lower | upper | abs

``len(text)`` is the length in characters. A comparison with a missing
(null) value is not true, so the record is dropped.

The top-level ``and`` clauses are checked in order and the first one that
does not hold is the drop reason, written as in the recipe
(``fasttext_score >= 0.3``), so the funnel shows which condition removed
what.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<number>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)
    | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<quoted>`[^`]+`)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op><=|>=|==|!=|<|>|\+|-|\*|/|\(|\)|\[|\]|,)
    )""", re.VERBOSE)

KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false"}
COMPARE = {"<": pc.less, "<=": pc.less_equal, ">": pc.greater, ">=": pc.greater_equal,
           "==": pc.equal, "!=": pc.not_equal}
ARITH = {"+": pc.add, "-": pc.subtract, "*": pc.multiply, "/": pc.divide}
FUNCTIONS = {"len": pc.utf8_length, "lower": pc.utf8_lower, "upper": pc.utf8_upper, "abs": pc.abs}


class ExpressionError(ValueError):
    """An expression that does not parse; the message points at the position."""


@dataclass(frozen=True)
class Node:
    """One node of the parsed expression: ``op`` and its ``args`` (nodes or values)."""

    op: str
    args: tuple[Any, ...]
    source: str = ""


def tokenize(text: str) -> list[tuple[str, str, int]]:
    """(kind, value, position) tokens of ``text``; ExpressionError on a stray character."""
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ExpressionError(f"unexpected character {text[pos]!r} at position {pos}")
        kind = m.lastgroup
        value = m.group(kind)
        start = m.start(kind)
        if kind == "name" and value in KEYWORDS:
            kind = "keyword"
        tokens.append((kind, value, start))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    def peek(self, value: str | None = None, kind: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        k, v, _ = self.tokens[self.i]
        return (value is None or v == value) and (kind is None or k == kind)

    def take(self, value: str | None = None) -> tuple[str, str, int]:
        if self.i >= len(self.tokens):
            raise ExpressionError(f"unexpected end of expression{f', expected {value!r}' if value else ''}")
        tok = self.tokens[self.i]
        if value is not None and tok[1] != value:
            raise ExpressionError(f"expected {value!r} at position {tok[2]}, got {tok[1]!r}")
        self.i += 1
        return tok

    def _pos(self) -> int:
        return self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)

    def parse(self) -> Node:
        if not self.tokens:
            raise ExpressionError("empty expression")
        node = self.or_expr()
        if self.i < len(self.tokens):
            _, v, p = self.tokens[self.i]
            raise ExpressionError(f"unexpected {v!r} at position {p}")
        return node

    def _span(self, start: int, node: Node) -> Node:
        return Node(node.op, node.args, self.text[start:self._pos()].strip())

    def or_expr(self) -> Node:
        start = self._pos()
        args = [self.and_expr()]
        while self.peek("or"):
            self.take()
            args.append(self.and_expr())
        return args[0] if len(args) == 1 else self._span(start, Node("or", tuple(args)))

    def and_expr(self) -> Node:
        start = self._pos()
        args = [self.not_expr()]
        while self.peek("and"):
            self.take()
            args.append(self.not_expr())
        return args[0] if len(args) == 1 else self._span(start, Node("and", tuple(args)))

    def not_expr(self) -> Node:
        start = self._pos()
        if self.peek("not"):
            self.take()
            return self._span(start, Node("not", (self.not_expr(),)))
        return self.comparison()

    def comparison(self) -> Node:
        start = self._pos()
        left = self.sum()
        if self.i < len(self.tokens) and self.tokens[self.i][1] in COMPARE:
            op = self.take()[1]
            return self._span(start, Node(op, (left, self.sum())))
        negate = False
        if self.peek("not") and self.i + 1 < len(self.tokens) and self.tokens[self.i + 1][1] == "in":
            self.take()
            negate = True
        if self.peek("in"):
            self.take()
            node = Node("in", (left, self.literal_list()))
            node = Node("not", (node,)) if negate else node
            return self._span(start, node)
        if self.peek("is"):
            self.take()
            neg = self.peek("not")
            if neg:
                self.take()
            self.take("null")
            return self._span(start, Node("is_valid" if neg else "is_null", (left,)))
        return left

    def sum(self) -> Node:
        start = self._pos()
        node = self.product()
        while self.peek("+") or self.peek("-"):
            op = self.take()[1]
            node = self._span(start, Node(op, (node, self.product())))
        return node

    def product(self) -> Node:
        start = self._pos()
        node = self.unary()
        while self.peek("*") or self.peek("/"):
            op = self.take()[1]
            node = self._span(start, Node(op, (node, self.unary())))
        return node

    def unary(self) -> Node:
        start = self._pos()
        if self.peek("-"):
            self.take()
            return self._span(start, Node("neg", (self.unary(),)))
        return self.atom()

    def literal_list(self) -> tuple[Any, ...]:
        self.take("[")
        values = [self.literal()]
        while self.peek(","):
            self.take()
            values.append(self.literal())
        self.take("]")
        return tuple(values)

    def literal(self) -> Any:
        neg = False
        if self.peek("-"):
            self.take()
            neg = True
        kind, value, pos = self.take()
        if kind == "number":
            num = float(value) if any(c in value for c in ".eE") else int(value)
            return -num if neg else num
        if neg:
            raise ExpressionError(f"'-' before a non-number at position {pos}")
        if kind == "string":
            return re.sub(r"\\(.)", r"\1", value[1:-1])
        if kind == "keyword" and value in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[value]
        raise ExpressionError(f"expected a literal at position {pos}, got {value!r}")

    def atom(self) -> Node:
        if self.i >= len(self.tokens):
            raise ExpressionError("unexpected end of expression")
        kind, value, pos = self.tokens[self.i]
        if kind in ("number", "string") or value in ("true", "false", "null"):
            return Node("literal", (self.literal(),), value)
        if value == "(":
            self.take()
            node = self.or_expr()
            self.take(")")
            return node
        if kind == "quoted":
            self.take()
            return Node("column", (value[1:-1],), value)
        if kind == "name":
            self.take()
            if self.peek("("):
                if value not in FUNCTIONS:
                    raise ExpressionError(f"unknown function {value!r} at position {pos}; "
                                          f"functions: {', '.join(sorted(FUNCTIONS))}")
                self.take("(")
                arg = self.or_expr()
                self.take(")")
                return Node("call", (value, arg), f"{value}({arg.source})")
            return Node("column", (value,), value)
        raise ExpressionError(f"unexpected {value!r} at position {pos}")


def parse_expression(text: str) -> Node:
    """Parse ``text`` into a ``Node`` tree; ExpressionError says where it fails.

    >>> parse_expression("score >= 0.3 and len(text) > 50").op
    'and'
    """
    return _Parser(text).parse()


def columns_of(node: Node) -> set[str]:
    """Every column an expression reads."""
    if node.op == "column":
        return {node.args[0]}
    out: set[str] = set()
    for a in node.args:
        if isinstance(a, Node):
            out |= columns_of(a)
    return out


def evaluate(node: Node, table: pa.Table) -> Any:
    """The value of ``node`` on every row of ``table`` (an Arrow array or a scalar)."""
    op, args = node.op, node.args
    if op == "literal":
        return pa.scalar(args[0])
    if op == "column":
        return table.column(args[0])
    if op == "call":
        return FUNCTIONS[args[0]](evaluate(args[1], table))
    if op == "and":
        out = evaluate(args[0], table)
        for a in args[1:]:
            out = pc.and_kleene(out, evaluate(a, table))
        return out
    if op == "or":
        out = evaluate(args[0], table)
        for a in args[1:]:
            out = pc.or_kleene(out, evaluate(a, table))
        return out
    if op == "not":
        return pc.invert(evaluate(args[0], table))
    if op == "neg":
        return pc.negate(evaluate(args[0], table))
    if op == "in":
        values = evaluate(args[0], table)
        return pc.is_in(values, value_set=pa.array(list(args[1])))
    if op == "is_null":
        return pc.is_null(evaluate(args[0], table))
    if op == "is_valid":
        return pc.is_valid(evaluate(args[0], table))
    if op in COMPARE:
        return COMPARE[op](evaluate(args[0], table), evaluate(args[1], table))
    if op in ARITH:
        left, right = evaluate(args[0], table), evaluate(args[1], table)
        if op == "/":
            left = pc.cast(left, pa.float64())
        return ARITH[op](left, right)
    raise ExpressionError(f"cannot evaluate {op!r}")


def holds(node: Node, table: pa.Table) -> np.ndarray:
    """Boolean mask: where ``node`` is true (null counts as false)."""
    value = evaluate(node, table)
    if isinstance(value, pa.Scalar):
        return np.full(table.num_rows, bool(value.as_py()), dtype=bool)
    if not pa.types.is_boolean(value.type):
        raise ExpressionError(f"{node.source!r} is not a condition (it gives {value.type})")
    return pc.fill_null(value, False).to_numpy(zero_copy_only=False).astype(bool)


class ExpressionParams(StageParams):
    expr: str = Field(description="condition records must meet, e.g. "
                      "\"fasttext_score >= 0.3 and text_stats_words > 50\"")

    @field_validator("expr")
    @classmethod
    def _parses(cls, v: str) -> str:
        parse_expression(v)
        return v


class ExpressionFilter(RowStage):
    """Keep the records where ``expr`` holds; the reason of a drop is the first
    top-level ``and`` clause that fails, as written in the recipe.

    Parameters
    ----------
    expr : str
        The condition (grammar in the module docstring).

    Examples
    --------
    >>> import pyarrow as pa
    >>> f = ExpressionFilter({"expr": "score >= 0.3 and len(text) > 3"})
    >>> out = f.process(pa.table({"id": ["a", "b", "c"], "text": ["long text", "abc", "text"],
    ...                           "score": [0.9, 0.8, 0.1]}))
    >>> out.kept.column("id").to_pylist(), out.dropped.column("reason").to_pylist()
    (['a'], ['len(text) > 3', 'score >= 0.3'])
    """

    type_name = "filter"
    Params: ClassVar = ExpressionParams

    def _clauses(self) -> list[Node]:
        node = parse_expression(self.params.expr)
        return list(node.args) if node.op == "and" else [node]

    def input_columns(self) -> tuple[str, ...]:
        return tuple(sorted(columns_of(parse_expression(self.params.expr))))

    def process(self, batch: pa.Table) -> StageOutput:
        keep = np.ones(batch.num_rows, dtype=bool)
        reasons = np.empty(batch.num_rows, dtype=object)
        for clause in self._clauses():
            try:
                ok = holds(clause, batch)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                raise ExpressionError(f"{clause.source!r}: {e}") from None
            newly = keep & ~ok
            reasons[newly] = clause.source
            keep &= ok
        return split_batch(batch, keep, self.name, reasons)
