"""Print plan expressions (sympy) as source text: spec-like text for `optgen show`, torch code.

Hand-written rather than sympy's code printers so the output reads like the spec: divisions stay
divisions, ``sqrt`` stays ``sqrt``, and numbers print exactly (``repr`` of the float64).
"""

from __future__ import annotations

import sympy

from optgen.codegen import expr as E

_PREC_ADD, _PREC_MUL, _PREC_UNARY, _PREC_POW, _PREC_ATOM = 1, 2, 3, 4, 5
_RELATIONS = {sympy.Eq: "==", sympy.Ne: "!=", sympy.Lt: "<", sympy.Le: "<=", sympy.Gt: ">", sympy.Ge: ">="}


class TextPrinter:
    """Spec-like syntax: what `optgen show --plan` prints."""

    def doprint(self, expr: sympy.Basic) -> str:
        return self.p(expr)[0]

    # Each method returns (text, precedence) so parentheses appear only where needed.
    def p(self, e: sympy.Basic) -> tuple[str, int]:
        if isinstance(e, sympy.Symbol):
            return str(e), _PREC_ATOM
        if e is sympy.true or e is sympy.false:
            return self.boolean(bool(e)), _PREC_ATOM
        if e.is_Number:
            return self.number(e)
        if isinstance(e, sympy.Add):
            return self.add(e)
        if isinstance(e, sympy.Mul):
            return self.mul(e)
        if isinstance(e, sympy.Pow):
            return self.pow(e)
        if type(e) in _RELATIONS:
            return f"{self.wrap(e.args[0], _PREC_ADD)} {_RELATIONS[type(e)]} {self.wrap(e.args[1], _PREC_ADD)}", 0
        if isinstance(e, (sympy.And, sympy.Or)):
            return self.logic(e)
        if isinstance(e, sympy.Not):
            return self.negate(e.args[0])
        return self.call(e)

    def wrap(self, e: sympy.Basic, precedence: int) -> str:
        text, prec = self.p(e)
        return f"({text})" if prec < precedence else text

    def number(self, e: sympy.Number) -> tuple[str, int]:
        if e.is_Integer:
            text = str(int(e))
        elif e.is_Rational:
            text = repr(float(e))
        else:
            text = repr(float(e))
        return text, (_PREC_UNARY if text.startswith("-") else _PREC_ATOM)

    def boolean(self, value: bool) -> str:
        return str(value)

    def add(self, e: sympy.Add) -> tuple[str, int]:
        # Positive terms first, constants before symbols among them: "1 - beta1", not "-beta1 + 1".
        def negative(a: sympy.Basic) -> bool:
            coeff = a.as_coeff_Mul()[0]
            return bool(coeff.is_Number and coeff < 0)

        terms = sorted(e.args, key=lambda a: (negative(a), not a.is_Number, sympy.default_sort_key(a)))
        out = ""
        for i, term in enumerate(terms):
            minus = negative(term)
            body = self.wrap(-term, _PREC_ADD + 1) if minus else self.wrap(term, _PREC_ADD)
            if i == 0:
                out = f"-{body}" if minus else body
            else:
                out += f" - {body}" if minus else f" + {body}"
        return out, _PREC_ADD

    def mul(self, e: sympy.Mul) -> tuple[str, int]:
        coeff, rest = e.as_coeff_Mul()
        if coeff.is_Number and coeff < 0:
            text = self.wrap(-e, _PREC_UNARY)
            return f"-{text}", _PREC_UNARY
        numer, denom = [], []
        for factor in sympy.Mul.make_args(e):
            if factor.is_Rational and not factor.is_Integer:
                if factor.p != 1:
                    numer.append(sympy.Integer(factor.p))
                denom.append(sympy.Integer(factor.q))
            elif isinstance(factor, sympy.Pow) and factor.exp.is_Number and factor.exp < 0:
                denom.append(sympy.Pow(factor.base, -factor.exp))
            else:
                numer.append(factor)
        text = " * ".join(self.wrap(f, _PREC_MUL) for f in numer) if numer else "1"
        if denom:
            den = " * ".join(self.wrap(f, _PREC_MUL) for f in denom)
            den = f"({den})" if len(denom) > 1 else self.wrap(denom[0], _PREC_POW)
            text = f"{text} / {den}"
        return text, _PREC_MUL

    def pow(self, e: sympy.Pow) -> tuple[str, int]:
        base, exp = e.args
        if exp == sympy.Rational(1, 2):
            return self.function("sqrt", [base]), _PREC_ATOM
        if exp.is_Number and exp < 0:
            return self.mul(sympy.Mul(sympy.Integer(1), e, evaluate=False))
        return f"{self.wrap(base, _PREC_POW + 1)}**{self.wrap(exp, _PREC_POW + 1)}", _PREC_POW

    def logic(self, e: sympy.Basic) -> tuple[str, int]:
        joiner = " and " if isinstance(e, sympy.And) else " or "
        return joiner.join(self.wrap(a, 1) for a in e.args), 0

    def negate(self, e: sympy.Basic) -> tuple[str, int]:
        return f"not {self.wrap(e, 1)}", 0

    def function(self, name: str, args: list[sympy.Basic]) -> str:
        return f"{name}({', '.join(self.p(a)[0] for a in args)})"

    def call(self, e: sympy.Basic) -> tuple[str, int]:
        if e.func in E.REDUCTIONS.values():
            dim = int(e.args[1])
            name = {"amax": "max", "amin": "min"}.get(str(e.func), str(e.func))
            return f"{name}({self.p(e.args[0])[0]}, dim={'all' if dim == E.DIM_ALL else dim})", _PREC_ATOM
        if E.is_matrix_op(e):
            return self.matrix_op(e), _PREC_ATOM
        name = {sympy.Abs: "abs", sympy.Min: "min", sympy.Max: "max"}.get(e.func, str(e.func))
        return self.function(name, list(e.args)), _PREC_ATOM

    def matrix_op(self, e: sympy.Function) -> str:
        """Spec syntax; the torch printer passes the same options to optgen.runtime.matrix."""
        x = self.p(e.args[0])[0]
        if e.func == E.STANDARDIZE:
            dim = {E.DIM_ALL: "all", E.DIM_LONG: "long"}.get(int(e.args[1]), int(e.args[1]))
            return f"standardize({x}, dim={dim}, eps={self.p(e.args[2])[0]})"
        steps, method, dtype = (int(a) for a in e.args[1:])
        return f"whiten({x}, steps={steps}, method={E.WHITEN_METHODS[method]}, dtype={E.MATRIX_DTYPES[dtype]})"


class TorchPrinter(TextPrinter):
    """torch code: every name is a tensor (host scalars are 0-d float64 tensors).

    Given the plan's kinds, reductions print as calls to ``optgen.runtime.reductions``, which
    combine the shards of a sharded parameter; without them, as plain torch reductions.
    """

    def __init__(self, kinds: dict[sympy.Symbol, E.Kind] | None = None):
        self.kinds = kinds

    def boolean(self, value: bool) -> str:
        return f"torch.tensor({value})"

    def function(self, name: str, args: list[sympy.Basic]) -> str:
        return f"torch.{name}({', '.join(self.p(a)[0] for a in args)})"

    def logic(self, e: sympy.Basic) -> tuple[str, int]:
        joiner = " & " if isinstance(e, sympy.And) else " | "
        return joiner.join(f"({self.p(a)[0]})" for a in e.args), 0

    def negate(self, e: sympy.Basic) -> tuple[str, int]:
        return f"~({self.p(e)[0]})", _PREC_UNARY

    def call(self, e: sympy.Basic) -> tuple[str, int]:
        if e.func in E.REDUCTIONS.values() and self.kinds is not None:
            operand, dim = self.p(e.args[0])[0], int(e.args[1])
            of = E.kind_of(e.args[0], self.kinds)
            return f'reductions.{e.func}({operand}, dim={None if dim == E.DIM_ALL else dim}, of="{of}")', _PREC_ATOM
        if e.func in E.REDUCTIONS.values():
            operand, dim = self.wrap(e.args[0], _PREC_ATOM), int(e.args[1])
            keep = "" if dim == E.DIM_ALL else f"dim={dim}, keepdim=True"
            if str(e.func) == "norm":
                return f"torch.linalg.vector_norm({operand}{', ' + keep if keep else ''})", _PREC_ATOM
            return f"{operand}.{e.func}({keep})", _PREC_ATOM
        if E.is_matrix_op(e):
            return self.matrix_op(e), _PREC_ATOM
        if e.func in (sympy.Min, sympy.Max):
            return self.min_max(e), _PREC_ATOM
        if e.func == E.WHERE:
            cond, a, b = e.args
            return f"torch.where({self.p(cond)[0]}, {self.p(a)[0]}, {self.p(b)[0]})", _PREC_ATOM
        name = {sympy.Abs: "abs"}.get(e.func, str(e.func))
        return self.function(name, list(e.args)), _PREC_ATOM

    def matrix_op(self, e: sympy.Function) -> str:
        x = self.p(e.args[0])[0]
        if e.func == E.STANDARDIZE:
            dim = {E.DIM_ALL: "None", E.DIM_LONG: '"long"'}.get(int(e.args[1]), int(e.args[1]))
            return f"standardize({x}, dim={dim}, eps={self.p(e.args[2])[0]})"
        steps, method, dtype = (int(a) for a in e.args[1:])
        return f'whiten({x}, steps={steps}, method="{E.WHITEN_METHODS[method]}", dtype=torch.{E.MATRIX_DTYPES[dtype]})'

    def min_max(self, e: sympy.Basic) -> str:
        # torch.minimum/maximum need tensors; a constant bound becomes clamp(min=/max=).
        bound = "max" if e.func is sympy.Min else "min"
        numbers = [a for a in e.args if a.is_Number]
        tensors = [a for a in e.args if not a.is_Number]
        text = self.p(tensors[0])[0]
        for other in tensors[1:]:
            text = f"torch.{'minimum' if e.func is sympy.Min else 'maximum'}({text}, {self.p(other)[0]})"
        for n in numbers:
            text = f"torch.clamp({text}, {bound}={self.p(n)[0]})"
        return text
