"""Safe expressions: spec text → Python ``ast`` under a whitelist → sympy, with kinds.

Spec text is never executed: it is parsed by ``ast.parse`` (a parser, not an evaluator), every node
is checked against a whitelist, and sympy objects are built from the checked tree by hand.  No
``eval``, ``exec``, ``sympify`` or ``parse_expr`` touches spec text.  Numeric constants are folded
here in float64 with overflow checks, so sympy never evaluates a huge power.
"""

from __future__ import annotations

import ast
import difflib
import enum
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import sympy

from optgen.codegen.source import Location, SpecError

MAX_EXPRESSION_CHARS = 1000
MAX_DEPTH = 40
MAX_CONSTANT_EXPONENT = 64


class Kind(enum.IntEnum):
    """The shape of a value relative to its parameter ``p`` (see docs/spec-language.md#kinds)."""

    HOST = 0  # depends only on hyperparameters and the step: computed once, outside element-wise work
    SCALAR = 1  # one value per parameter tensor
    ROWS = 2  # p.shape[:-1]  (stored with a trailing 1 so it broadcasts against p)
    COLS = 3  # p.shape[:-2] + p.shape[-1:]  (stored with a 1 at dim -2)
    FULL = 4  # like p

    def __str__(self) -> str:
        return self.name.lower()


def join_kinds(*kinds: Kind) -> Kind:
    """The kind of an element-wise combination: rows with cols broadcast to full."""
    result = Kind.HOST
    for kind in kinds:
        if {result, kind} == {Kind.ROWS, Kind.COLS}:
            result = Kind.FULL
        else:
            result = max(result, kind)
    return result


# Library functions that sympy should keep as opaque calls (printed by each backend).
WHERE = sympy.Function("where")
REDUCTIONS = {name: sympy.Function(name) for name in ("mean", "sum", "amax", "amin", "norm")}
# Reduction dims travel as sympy Integers; 0 means "all" (0 is not a valid spec dim).
DIM_ALL = 0
REDUCED_KIND = {  # (operand kind, dim) -> result kind
    (Kind.FULL, -1): Kind.ROWS,
    (Kind.FULL, -2): Kind.COLS,
    (Kind.FULL, DIM_ALL): Kind.SCALAR,
    (Kind.ROWS, DIM_ALL): Kind.SCALAR,
    (Kind.COLS, DIM_ALL): Kind.SCALAR,
    (Kind.SCALAR, DIM_ALL): Kind.SCALAR,
}

# Matrix primitives (docs/spec-language.md#matrix-primitives): whole-matrix operations on a full
# value, planned as ``matrix`` stages.  Options travel as sympy Integers (indices into the tuples
# below), so they never become free symbols.
STANDARDIZE = sympy.Function("standardize")  # (x, dim, eps)
WHITEN = sympy.Function("whiten")  # (x, steps, method index, dtype index)
MATRIX_OPS = {"standardize": STANDARDIZE, "whiten": WHITEN}
WHITEN_METHODS = ("newton_schulz", "quintic")
MATRIX_DTYPES = ("float32", "bfloat16")
MAX_WHITEN_STEPS = 100
DIM_LONG = 1  # standardize(x, dim=long): along the longer of the last two dims (not a reduction dim)
DEFAULT_STANDARDIZE_EPS = 1.0e-8

ELEMENTWISE_FUNCTIONS = {"sqrt": 1, "abs": 1, "sign": 1, "exp": 1, "log": 1, "clamp": 3, "where": 3}
FUNCTIONS = sorted([*ELEMENTWISE_FUNCTIONS, "min", "max", "mean", "sum", "norm", *MATRIX_OPS])
ALLOWED_SYNTAX = "numbers, names, + - * / **, comparisons and and/or/not (inside where), and calls to " + ", ".join(
    FUNCTIONS
)

_DESCRIBE = {
    ast.Attribute: "attribute access (x.y)",
    ast.Subscript: "indexing (x[i])",
    ast.Lambda: "lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.JoinedStr: "an f-string",
    ast.FormattedValue: "an f-string",
    ast.IfExp: "a conditional expression (use where(cond, a, b))",
    ast.List: "a list",
    ast.Tuple: "a tuple",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.Starred: "star arguments",
    ast.NamedExpr: "the walrus operator",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.Slice: "slicing",
}


def describe(node: ast.AST) -> str:
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r}" if not isinstance(node.value, str) else "a string"
    if isinstance(node, ast.BinOp):
        return f"the operator {type(node.op).__name__}"
    return _DESCRIBE.get(type(node), type(node).__name__)


@dataclass(frozen=True)
class Binding:
    """What a name means inside an expression."""

    symbol: sympy.Symbol
    kind: Kind
    is_bool: bool = False


_BOOLEANS = (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction, sympy.logic.boolalg.BooleanAtom)
Resolver = Callable[[str, Location], Binding]


def _check_text(text: str, where: Location) -> None:
    if not isinstance(text, str):
        raise SpecError(f"expected an expression as text, got {type(text).__name__}", where)
    if len(text) > MAX_EXPRESSION_CHARS:
        raise SpecError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters", where)


def _parse(text: str, mode: str, where: Location) -> ast.AST:
    _check_text(text, where)
    source = text.strip()
    lines = re.split(r"\r\n|\r|\n", source)  # Python's line breaks
    starts = [len(text) - len(text.lstrip())]  # offset in text of each line of source
    for line, brk in zip(lines, re.findall(r"\r\n|\r|\n", source), strict=False):
        starts.append(starts[-1] + len(line) + len(brk))

    def offset(lineno: int | None, column: int) -> int:  # (line in source, character) -> offset in text
        index = (lineno or 1) - 1
        return starts[min(max(index, 0), len(starts) - 1)] + max(column, 0)

    try:
        tree = ast.parse(source, mode=mode)
    except SyntaxError as err:
        raise SpecError(f"syntax error: {err.msg}", where.shifted(offset(err.lineno, (err.offset or 1) - 1))) from None
    except (RecursionError, MemoryError):
        raise SpecError("expression is too deeply nested", where) from None
    except ValueError as err:  # e.g. a NUL character
        raise SpecError(f"invalid expression: {err}", where) from None
    _check_depth(tree, where)
    # Make every col_offset the character offset of the node in ``text`` (ast counts UTF-8 bytes
    # from the start of its line), so ``where.shifted(node.col_offset)`` finds it in the file.
    for node in ast.walk(tree):
        if isinstance(getattr(node, "col_offset", None), int) and isinstance(getattr(node, "lineno", None), int):
            index = node.lineno - 1
            line = lines[index] if 0 <= index < len(lines) else ""
            node.col_offset = offset(node.lineno, len(line.encode()[: node.col_offset].decode(errors="ignore")))
            node.lineno = 1
    return tree


def _check_depth(tree: ast.AST, where: Location) -> None:
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SpecError(f"expression is nested more than {MAX_DEPTH} levels deep", where)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def parse_statement(text: str, where: Location) -> tuple[str, Location, ast.expr]:
    """``target = expr`` (or ``target op= expr``) → (target, its location, expression tree)."""
    tree = _parse(text, "exec", where)
    body = tree.body  # type: ignore[attr-defined]
    if len(body) != 1:
        raise SpecError("one statement per update line", where, "write `name = expression`")
    stmt = body[0]
    if isinstance(stmt, ast.Assign):
        if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
            raise SpecError("the left side of an update must be a single name", where, "write `name = expression`")
        target = stmt.targets[0]
        return target.id, where.shifted(target.col_offset), stmt.value
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
        if not isinstance(stmt.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            raise SpecError("only += -= *= /= are allowed", where)
        target = stmt.target
        value = ast.BinOp(left=ast.Name(id=target.id, ctx=ast.Load()), op=stmt.op, right=stmt.value)
        ast.copy_location(value, stmt.value)
        ast.copy_location(value.left, target)
        return target.id, where.shifted(target.col_offset), value
    raise SpecError("an update line must be an assignment", where, "write `name = expression`")


def parse_expression(text: str, where: Location) -> ast.expr:
    return _parse(text, "eval", where).body  # type: ignore[attr-defined]


def suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"did you mean '{close[0]}'?" if close else "known names: " + ", ".join(sorted(candidates))


def number(value: float) -> sympy.Expr:
    """A folded constant as sympy: exact Integer when integral and small, else Float."""
    if not math.isfinite(value):
        raise OverflowError
    if value == int(value) and abs(value) < 2**53:
        return sympy.Integer(int(value))
    return sympy.Float(value)


class Builder:
    """Turns one whitelisted expression tree into (sympy expression, kind)."""

    def __init__(self, resolve: Resolver, where: Location):
        self.resolve = resolve
        self.where = where

    def at(self, node: ast.AST) -> Location:
        return self.where.shifted(getattr(node, "col_offset", 0))

    def fail(self, node: ast.AST, message: str, hint: str | None = None) -> SpecError:
        return SpecError(message, self.at(node), hint)

    def build(self, node: ast.AST) -> tuple[sympy.Expr, Kind]:
        expr, kind = self._build(node)
        if isinstance(expr, _BOOLEANS):
            raise self.fail(node, "a comparison can only be the condition of where(cond, a, b)")
        return expr, kind

    def _build(self, node: ast.AST) -> tuple[sympy.Expr, Kind]:
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise self.fail(node, f"{describe(node)} is not allowed in a spec expression", "allowed: " + ALLOWED_SYNTAX)
        return method(node)

    def _Constant(self, node: ast.Constant) -> tuple[sympy.Expr, Kind]:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(node, f"{describe(node)} is not allowed in a spec expression", "only numbers")
        try:
            return number(float(value)), Kind.HOST
        except OverflowError:
            raise self.fail(node, "number is too large for float64") from None

    def _Name(self, node: ast.Name) -> tuple[sympy.Expr, Kind]:
        if node.id.startswith("__"):
            raise self.fail(node, f"names starting with '__' are not allowed ({node.id})")
        binding = self.resolve(node.id, self.at(node))
        return binding.symbol, binding.kind

    def _UnaryOp(self, node: ast.UnaryOp) -> tuple[sympy.Expr, Kind]:
        if isinstance(node.op, ast.Not):
            cond, kind = self.condition(node.operand)
            return sympy.Not(cond), kind
        operand, kind = self.build(node.operand)
        if isinstance(node.op, ast.USub):
            return -operand, kind
        if isinstance(node.op, ast.UAdd):
            return operand, kind
        raise self.fail(node, "the operator ~ is not allowed", "allowed: " + ALLOWED_SYNTAX)

    def _BinOp(self, node: ast.BinOp) -> tuple[sympy.Expr, Kind]:
        left, lkind = self.build(node.left)
        right, rkind = self.build(node.right)
        kind = join_kinds(lkind, rkind)
        op = type(node.op)
        if op not in (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow):
            raise self.fail(node, f"the operator {op.__name__} is not allowed", "allowed: + - * / **")
        if left.is_Number and right.is_Number:  # fold in float64 so sympy never evaluates a huge constant
            a, b = float(left), float(right)
            # (checked outside the try: SpecError is a ValueError, which the try turns into "overflows")
            if op is ast.Div and b == 0:
                raise self.fail(node, "division by zero")
            if op is ast.Pow and abs(b) > MAX_CONSTANT_EXPONENT:
                raise self.fail(node, f"constant exponent {b:g} is out of range (|e| <= {MAX_CONSTANT_EXPONENT})")
            try:
                folded = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}.get(op)
                if folded is None:
                    folded = a / b if op is ast.Div else math.pow(a, b)
                return number(folded), kind
            except (OverflowError, ValueError):
                raise self.fail(node, "constant expression overflows or is undefined in float64") from None
        if op is ast.Add:
            return left + right, kind
        if op is ast.Sub:
            return left - right, kind
        if op is ast.Mult:
            return left * right, kind
        if op is ast.Div:
            if right.is_Number and right == 0:
                raise self.fail(node, "division by zero")
            return left / right, kind
        if right.is_Number and abs(float(right)) > MAX_CONSTANT_EXPONENT:
            raise self.fail(
                node, f"constant exponent {float(right):g} is out of range (|e| <= {MAX_CONSTANT_EXPONENT})"
            )
        return sympy.Pow(left, right), kind

    def condition(self, node: ast.AST) -> tuple[sympy.Basic, Kind]:
        """A boolean: a comparison, and/or/not of them, or a bool hyperparameter."""
        if isinstance(node, ast.Name):
            binding = self.resolve(node.id, self.at(node))
            if not binding.is_bool:
                raise self.fail(node, f"'{node.id}' is a number, not a condition", f"compare it, e.g. {node.id} > 0")
            return sympy.Ne(binding.symbol, 0), binding.kind
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1:
                raise self.fail(node, "chained comparisons are not allowed", "use and: a < b and b < c")
            left, lkind = self.build(node.left)
            right, rkind = self.build(node.comparators[0])
            relation = {
                ast.Lt: sympy.Lt,
                ast.LtE: sympy.Le,
                ast.Gt: sympy.Gt,
                ast.GtE: sympy.Ge,
                ast.Eq: sympy.Eq,
                ast.NotEq: sympy.Ne,
            }.get(type(node.ops[0]))
            if relation is None:
                raise self.fail(
                    node, f"the comparison {type(node.ops[0]).__name__} is not allowed", "use < <= > >= == !="
                )
            return relation(left, right), join_kinds(lkind, rkind)
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(value) for value in node.values]
            combine = sympy.And if isinstance(node.op, ast.And) else sympy.Or
            return combine(*(p for p, _ in parts)), join_kinds(*(k for _, k in parts))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            cond, kind = self.condition(node.operand)
            return sympy.Not(cond), kind
        raise self.fail(node, "expected a condition (a comparison such as step == 1, or a bool hyperparameter)")

    def _Compare(self, node: ast.Compare) -> tuple[sympy.Basic, Kind]:
        return self.condition(node)

    def _BoolOp(self, node: ast.BoolOp) -> tuple[sympy.Basic, Kind]:
        return self.condition(node)

    def _Call(self, node: ast.Call) -> tuple[sympy.Expr, Kind]:
        if not isinstance(node.func, ast.Name):
            raise self.fail(node, "only library functions can be called", "functions: " + ", ".join(FUNCTIONS))
        name = node.func.id
        if name not in FUNCTIONS:
            raise self.fail(node, f"unknown function '{name}'", suggest(name, FUNCTIONS))
        if name in MATRIX_OPS:
            return self._matrix_op(node, name)
        keywords = {}
        for keyword in node.keywords:
            if keyword.arg != "dim":
                raise self.fail(keyword.value, f"{name}() takes no keyword '{keyword.arg}'", "only dim= (reductions)")
            keywords["dim"] = self._dim(keyword.value)
        if name in ("mean", "sum", "norm") or (name in ("min", "max") and "dim" in keywords):
            return self._reduction(node, name, keywords)
        if keywords:
            raise self.fail(node, f"{name}() takes no dim=", "reductions are mean, sum, norm, min, max with dim=")
        arity = ELEMENTWISE_FUNCTIONS.get(name, 2)
        if len(node.args) != arity:
            raise self.fail(node, f"{name}() takes {arity} argument{'s' * (arity > 1)}, got {len(node.args)}")
        if name == "where":
            cond, ckind = self.condition(node.args[0])
            (a, akind), (b, bkind) = self.build(node.args[1]), self.build(node.args[2])
            kind = join_kinds(ckind, akind, bkind)
            if cond is sympy.true:
                return a, kind
            if cond is sympy.false:
                return b, kind
            return WHERE(cond, a, b), kind
        args = [self.build(arg) for arg in node.args]
        kind = join_kinds(*(k for _, k in args))
        values = [a for a, _ in args]
        if all(v.is_Number for v in values):
            return self._fold_call(node, name, [float(v) for v in values]), kind
        if name == "clamp":
            return sympy.Min(sympy.Max(values[0], values[1], evaluate=False), values[2], evaluate=False), kind
        function = {
            "sqrt": sympy.sqrt,
            "abs": sympy.Abs,
            "sign": sympy.sign,
            "exp": sympy.exp,
            "log": sympy.log,
            # unevaluated: sympy's Min/Max simplification is slow on deep nests of distinct names
            "min": lambda *a: sympy.Min(*a, evaluate=False),
            "max": lambda *a: sympy.Max(*a, evaluate=False),
        }[name]
        return function(*values), kind

    def _fold_call(self, node: ast.Call, name: str, values: list[float]) -> sympy.Expr:
        try:
            folded = {
                "sqrt": lambda x: math.sqrt(x),
                "abs": abs,
                "sign": lambda x: float((x > 0) - (x < 0)),
                "exp": math.exp,
                "log": math.log,
                "min": min,
                "max": max,
                "clamp": lambda x, lo, hi: min(max(x, lo), hi),
            }[name](*values)
            return number(folded)
        except (OverflowError, ValueError):
            raise self.fail(node, f"{name}() of these constants is undefined or overflows in float64") from None

    def _dim(self, node: ast.AST, also: str = "") -> int:
        if isinstance(node, ast.Name) and node.id == "all":
            return DIM_ALL
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            if node.operand.value in (1, 2) and not isinstance(node.operand.value, bool):
                return -node.operand.value
        valid = "-1 (along rows), -2 (along columns)" + (f", {also}," if also else "") + " or all"
        raise self.fail(node, f"dim must be {valid}")

    def _reduction(self, node: ast.Call, name: str, keywords: dict) -> tuple[sympy.Expr, Kind]:
        if "dim" not in keywords:
            raise self.fail(node, f"{name}() needs dim=", "dim=-1, dim=-2 or dim=all")
        if len(node.args) != 1:
            raise self.fail(node, f"{name}(x, dim=...) takes 1 positional argument, got {len(node.args)}")
        operand, kind = self.build(node.args[0])
        dim = keywords["dim"]
        result = REDUCED_KIND.get((kind, dim))
        if result is None:
            dim_text = "all" if dim == DIM_ALL else dim
            raise self.fail(node, f"kind clash: cannot reduce a {kind} value over dim={dim_text}")
        function = REDUCTIONS[{"min": "amin", "max": "amax"}.get(name, name)]
        return function(operand, sympy.Integer(dim)), result

    def _matrix_op(self, node: ast.Call, name: str) -> tuple[sympy.Expr, Kind]:
        """``standardize(x, dim=D, eps=E)`` or ``whiten(x, steps=N, method=M, dtype=T)``: full → full."""
        allowed = {"standardize": ("dim", "eps"), "whiten": ("steps", "method", "dtype")}[name]
        signature = {
            "standardize": "standardize(x, dim=-1|-2|long|all, eps=1e-8)",
            "whiten": "whiten(x, steps=N, method=newton_schulz|quintic, dtype=float32|bfloat16)",
        }[name]
        if len(node.args) != 1:
            raise self.fail(node, f"{name}() takes 1 positional argument, got {len(node.args)}", signature)
        keywords: dict[str, ast.expr] = {}
        for keyword in node.keywords:
            if keyword.arg not in allowed:
                what = "star arguments" if keyword.arg is None else f"keyword '{keyword.arg}'"
                raise self.fail(keyword.value, f"{name}() takes no {what}", signature)
            keywords[keyword.arg] = keyword.value
        operand, kind = self.build(node.args[0])
        if kind is not Kind.FULL:
            raise self.fail(
                node.args[0], f"kind clash: {name}() needs a full value (a matrix), got {kind}", "e.g. grad"
            )
        if name == "standardize":
            if "dim" not in keywords:
                raise self.fail(node, "standardize() needs dim=", signature)
            dim_node = keywords["dim"]
            long = isinstance(dim_node, ast.Name) and dim_node.id == "long"
            dim = DIM_LONG if long else self._dim(dim_node, also="long (the longer of the last two dims)")
            eps, eps_kind = (
                self.build(keywords["eps"]) if "eps" in keywords else (number(DEFAULT_STANDARDIZE_EPS), Kind.HOST)
            )
            if eps_kind is not Kind.HOST:
                raise self.fail(keywords["eps"], f"eps must be a number or hyperparameter expression, got a {eps_kind}")
            if eps.is_Number and float(eps) <= 0:
                raise self.fail(keywords["eps"], "eps must be positive (it guards a zero standard deviation)")
            return STANDARDIZE(operand, sympy.Integer(dim), eps), Kind.FULL
        if "steps" not in keywords:
            raise self.fail(node, "whiten() needs steps=", signature)
        steps_node = keywords["steps"]
        steps = steps_node.value if isinstance(steps_node, ast.Constant) else None
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_WHITEN_STEPS:
            raise self.fail(steps_node, f"steps must be a whole number from 1 to {MAX_WHITEN_STEPS}", "e.g. steps=5")
        method = self._choice(keywords.get("method"), "method", WHITEN_METHODS)
        dtype = self._choice(keywords.get("dtype"), "dtype", MATRIX_DTYPES)
        return WHITEN(operand, sympy.Integer(steps), sympy.Integer(method), sympy.Integer(dtype)), Kind.FULL

    def _choice(self, node: ast.expr | None, what: str, choices: tuple[str, ...]) -> int:
        """A bare option name (``method=quintic``), never resolved as a spec name; the first is the default."""
        if node is None:
            return 0
        if not isinstance(node, ast.Name) or node.id not in choices:
            shown = node.id if isinstance(node, ast.Name) else describe(node)
            raise self.fail(node, f"unknown {what} {shown!r}", f"{what} is one of: {', '.join(choices)}")
        return choices.index(node.id)


def build_expression(node: ast.expr, resolve: Resolver, where: Location) -> tuple[sympy.Expr, Kind]:
    expr, kind = Builder(resolve, where).build(node)
    _check_finite(expr, where)
    return expr, kind


def build_condition(node: ast.expr, resolve: Resolver, where: Location) -> tuple[sympy.Basic, Kind]:
    return Builder(resolve, where).condition(node)


def _check_finite(expr: sympy.Basic, where: Location) -> None:
    for atom in expr.atoms(sympy.Number):
        if atom.has(sympy.zoo, sympy.oo, sympy.nan) or not math.isfinite(float(atom)):
            raise SpecError("expression contains an infinite or undefined constant", where)
    if expr.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
        raise SpecError("expression contains an infinite or undefined constant (division by zero?)", where)


def kind_of(expr: sympy.Basic, kinds: dict[sympy.Symbol, Kind]) -> Kind:
    """The kind of any sympy (sub)expression built by this module."""
    if isinstance(expr, sympy.Symbol):
        return kinds[expr]
    if expr.is_Number or isinstance(expr, sympy.logic.boolalg.BooleanAtom):
        return Kind.HOST
    if isinstance(expr, sympy.Function) and expr.func in REDUCTIONS.values():
        return REDUCED_KIND[(kind_of(expr.args[0], kinds), int(expr.args[1]))]
    if is_matrix_op(expr):
        return Kind.FULL
    return join_kinds(*(kind_of(arg, kinds) for arg in expr.args))


def free_names(tree: ast.AST) -> list[ast.Name]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Name)]


def is_matrix_op(expr: sympy.Basic) -> bool:
    return isinstance(expr, sympy.Function) and expr.func in MATRIX_OPS.values()
