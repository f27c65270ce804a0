"""Spec language v1: a YAML file → a validated, typed :class:`Spec`.

Everything a spec author can get wrong is caught here with a :class:`SpecError` that names the
file, line and column and what would be valid.  The update program is resolved into single
assignments (SSA): reading a state after it was assigned reads the new value, as in the paper.
"""

from __future__ import annotations

import ast
import hashlib
import keyword
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sympy

from optgen.codegen import expr as E
from optgen.codegen import quant as Q
from optgen.codegen.expr import Binding, Kind
from optgen.codegen.quant import QuantScheme
from optgen.codegen.source import Document, Location, SpecError, SpecWarning, load_document, read_document

SPEC_VERSION = 1
STEP_BYTES = 4  # the float32 step counter each parameter keeps
DEFAULT_KEEP_FULL_PRECISION = 4096  # lpmm and bitsandbytes keep small tensors' state in 32 bits
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "specs"

TOP_KEYS = {
    "optgen": "spec language version (1)",
    "name": "module name, e.g. adamw",
    "class": "optimizer class name, e.g. AdamW",
    "summary": "one line shown by `optgen list`",
    "hyper": "hyperparameters (constructor keywords)",
    "state": "state tensors kept per parameter",
    "define": "named expressions (order does not matter)",
    "update": "the update statements, in order",
    "applies_to": "which parameters this spec updates, e.g. ndim >= 2",
    "otherwise": "the spec for the other parameters",
    "keep_full_precision": "{numel_at_most: N}: quantized states of small tensors stay float32",
}
HYPER_KEYS = {"default", "in", "names", "doc"}
STATE_KEYS = {"init", "store", "kind", "saved_as", "doc"}
STATE_KINDS = {"full": Kind.FULL, "rows": Kind.ROWS, "cols": Kind.COLS, "scalar": Kind.SCALAR}
FLOAT_STORES = {"float32", "bfloat16"}
QUANT_KEYS = ("bits", "signed", "normalize", "table")
PARAM_PROPERTIES = ("ndim", "numel")
# Spec names become Python names in generated code: keep clear of what that code itself uses.
RESERVED = {
    *("param", "grad", "step", "all", "ndim", "numel", *E.FUNCTIONS),
    *("params", "backend", "self", "super", "dict", "math", "torch", "state", "hyper"),
    *("load", "store", "quantized_or_float", "init_state", "update", "QuantScheme", "SCHEMES", "STATE_DTYPES"),
    *("GeneratedOptimizer", "Hyper", "Program"),
}
_GENERATED_NAME = re.compile(r"^(map|reduce|stats|matrix|takes|torch)_\w*$|^[htr]\d+$")
_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?inf$")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def __str__(self) -> str:
        return f"{'[' if self.low_closed else '('}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"


@dataclass(frozen=True)
class Hyper:
    """A constructor keyword. Tuples (``betas``) unpack into ``names`` inside expressions."""

    name: str
    default: float | bool | tuple[float, ...]
    names: tuple[str, ...]  # the names expressions use: (name,) or the unpacked names
    interval: Interval | None
    doc: str
    where: Location

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)

    @property
    def is_tuple(self) -> bool:
        return isinstance(self.default, tuple)


@dataclass(frozen=True)
class Storage:
    """How a state tensor is stored: a float dtype, or a quantized scheme (codes + scales).

    A quantized state falls back to ``dtype`` (float32) for tensors with at most
    ``keep_full_precision`` elements.
    """

    dtype: str  # float32 | bfloat16
    quant: QuantScheme | None = None

    @property
    def name(self) -> str:
        return self.quant.name if self.quant else self.dtype

    def nbytes(self, shape: tuple[int, ...], keep_full_precision: int) -> int:
        numel = math.prod(shape)
        if self.quant and numel > keep_full_precision:
            return self.quant.nbytes(shape)
        return numel * {"float32": 4, "bfloat16": 2}[self.dtype]


@dataclass(frozen=True)
class StateVar:
    name: str
    init: sympy.Expr  # over param and hypers
    init_kind: Kind
    store: Storage
    kind: Kind
    saved_as: str  # key in state_dict (torch.optim's name, e.g. exp_avg)
    doc: str
    where: Location


@dataclass(frozen=True)
class Assignment:
    """One step of the update program in SSA form: ``symbol = expr``, writing ``target``."""

    target: str  # spec name: a state, param, a temporary or a define
    symbol: sympy.Symbol
    expr: sympy.Expr
    kind: Kind
    text: str  # the spec line, for comments in generated code
    where: Location
    is_define: bool = False


@dataclass(frozen=True)
class Routing:
    """``applies_to`` / ``otherwise``: parameters failing ``condition`` use ``otherwise``."""

    condition_text: str  # validated Python source over ndim and numel
    condition: sympy.Basic  # the same condition in sympy, for planning by shape
    otherwise: Spec
    rename: dict[str, str]  # otherwise's hyper name -> constructor keyword
    where: Location

    def takes(self, shape: tuple[int, ...]) -> bool:
        values = {sympy.Symbol("ndim"): len(shape), sympy.Symbol("numel"): math.prod(shape)}
        return bool(self.condition.subs(values))


@dataclass
class Spec:
    name: str
    class_name: str
    summary: str
    hypers: list[Hyper]
    state: list[StateVar]
    program: list[Assignment]  # defines first (dependency order), then update statements
    outputs: dict[str, sympy.Symbol]  # state name / "param" -> symbol holding its final value
    kinds: dict[sympy.Symbol, Kind]
    routing: Routing | None
    keep_full_precision: int  # quantized states of tensors this small stay float32
    path: str
    text: str
    sha256: str = field(default="")

    @property
    def hyper_names(self) -> list[str]:
        return [h.name for h in self.hypers]

    def state_nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of state this spec keeps for one parameter of ``shape`` (its own program only)."""
        shapes = {
            Kind.FULL: tuple(shape),
            Kind.ROWS: tuple(shape[:-1]),
            Kind.COLS: tuple(shape[:-2]) + tuple(shape[-1:]),
            Kind.SCALAR: (),
        }
        return STEP_BYTES + sum(s.store.nbytes(shapes[s.kind], self.keep_full_precision) for s in self.state)

    def state_bytes_per_element(self, shape: tuple[int, ...] = (4096, 4096)) -> float:
        """State bytes per parameter element for a parameter of ``shape`` (default: a large matrix)."""
        return self.state_nbytes(shape) / math.prod(shape)

    def spec_for(self, shape: tuple[int, ...]) -> Spec:
        """The spec (this one or a fall-back) that updates a parameter of ``shape``."""
        if self.routing and not self.routing.takes(shape):
            return self.routing.otherwise.spec_for(shape)
        return self

    def all_specs(self) -> list[Spec]:
        """This spec and the specs its routing falls back to, in routing order."""
        return [self] + (self.routing.otherwise.all_specs() if self.routing else [])


def parse_spec(text: str, file: str = "<spec>") -> Spec:
    return _SpecParser(load_document(text, file), ()).parse()


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file, or a built-in spec by name (``adamw``)."""
    return _SpecParser(read_document(resolve_spec_path(path)), ()).parse()


def builtin_specs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def resolve_spec_path(path_or_name: str | Path, relative_to: Path | None = None) -> Path:
    text = str(path_or_name)
    if not text.endswith((".yaml", ".yml")) and "/" not in text and text in builtin_specs():
        return builtin_specs()[text]
    path = Path(text)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.exists():
        raise SpecError(
            f"no spec file or built-in spec named '{text}'",
            None,
            "built-in specs: " + ", ".join(builtin_specs()),
        )
    return path


class _SpecParser:
    def __init__(self, doc: Document, chain: tuple[str, ...]):
        self.doc = doc
        self.chain = chain  # files already on the otherwise-chain, to refuse cycles
        self.kinds: dict[sympy.Symbol, Kind] = {}
        self.bindings: dict[str, Binding] = {}
        self.defines: dict[str, Any] = {}

    def at(self, *path: Any) -> Location:
        return self.doc.at(*path)

    # -- structure -----------------------------------------------------------------------------
    def parse(self) -> Spec:
        top = self.doc.value
        if not isinstance(top, dict):
            raise SpecError("a spec must be a YAML mapping of keys", self.at(), "keys: " + ", ".join(TOP_KEYS))
        for key in top:
            if key not in TOP_KEYS:
                raise SpecError(f"unknown key '{key}'", self.doc.key_at(key), E.suggest(key, list(TOP_KEYS)))
        for key in ("optgen", "name", "class", "update"):
            if key not in top:
                raise SpecError(f"missing required key '{key}' ({TOP_KEYS[key]})", self.at())
        if isinstance(top["optgen"], bool) or top["optgen"] != SPEC_VERSION:
            raise SpecError(f"unsupported spec version {top['optgen']!r}", self.at("optgen"), "write optgen: 1")
        name = self.identifier(top["name"], ("name",), "spec name")
        class_name = self.identifier(top["class"], ("class",), "class name")
        summary = top.get("summary", "")
        if not isinstance(summary, str):
            raise SpecError("summary must be text", self.at("summary"))

        hypers = self.parse_hypers(top.get("hyper", {}))
        self.bind(Binding(sympy.Symbol("step"), Kind.HOST), "step")
        self.bind(Binding(sympy.Symbol("param"), Kind.FULL), "param")
        self.bind(Binding(sympy.Symbol("grad"), Kind.FULL), "grad")
        state = self.parse_state(top.get("state", {}), hypers)
        program, outputs = self.parse_program(top.get("define", {}), top["update"], state)
        routing = self.parse_routing(top)
        spec = Spec(
            name=name,
            class_name=class_name,
            summary=summary.strip(),
            hypers=hypers,
            state=state,
            program=program,
            outputs=outputs,
            kinds=dict(self.kinds),
            routing=routing,
            keep_full_precision=self.keep_full_precision(top),
            path=self.doc.file,
            text=self.doc.text,
        )
        warn_zero_point(spec)
        digest = hashlib.sha256(self.doc.text.encode())
        if routing:
            digest.update(routing.otherwise.sha256.encode())
        spec.sha256 = digest.hexdigest()
        return spec

    def identifier(self, value: Any, path: tuple, what: str) -> str:
        if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value):
            raise SpecError(f"{what} must be a Python identifier, got {value!r}", self.at(*path))
        if value.startswith("_"):
            raise SpecError(f"{what} must not start with '_' ({value})", self.at(*path))
        return value

    def new_name(self, name: str, path: tuple, what: str) -> str:
        self.identifier(name, path, what)
        where = self.doc.key_at(*path)
        if name in RESERVED or _GENERATED_NAME.match(name):
            raise SpecError(f"'{name}' is reserved and cannot name a {what}", where, "pick another name")
        if name in self.bindings:
            raise SpecError(f"'{name}' is already defined; {what} names must be unique", where)
        return name

    def bind(self, binding: Binding, name: str) -> None:
        self.bindings[name] = binding
        self.kinds[binding.symbol] = binding.kind

    def keep_full_precision(self, top: dict) -> int:
        section = top.get("keep_full_precision", {"numel_at_most": DEFAULT_KEEP_FULL_PRECISION})
        value = (
            section.get("numel_at_most") if isinstance(section, dict) and set(section) == {"numel_at_most"} else None
        )
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpecError(
                "keep_full_precision takes {numel_at_most: N} with N >= 0",
                self.at("keep_full_precision"),
                "e.g. keep_full_precision: {numel_at_most: 4096}",
            )
        return value

    # -- hyper ---------------------------------------------------------------------------------
    def parse_hypers(self, section: Any) -> list[Hyper]:
        if not isinstance(section, dict):
            raise SpecError("hyper must be a mapping of name: default", self.at("hyper"))
        hypers = []
        for name, value in section.items():
            path = ("hyper", name)
            self.new_name(name, path, "hyperparameter")
            spec = value if isinstance(value, dict) else {"default": value}
            for key in spec:
                if key not in HYPER_KEYS:
                    raise SpecError(
                        f"unknown key '{key}' in hyperparameter '{name}'",
                        self.doc.key_at(*path, key),
                        "keys: " + ", ".join(sorted(HYPER_KEYS)),
                    )
            dpath = path + ("default",) if isinstance(value, dict) else path
            if "default" not in spec:
                raise SpecError(f"hyperparameter '{name}' needs a default", self.at(*path))
            default = self.hyper_default(spec["default"], dpath, name)
            names: tuple[str, ...] = (name,)
            if isinstance(default, tuple):
                names = self.tuple_names(name, spec.get("names"), len(default), path)
            elif "names" in spec:
                raise SpecError(f"names only applies to tuple hyperparameters, and '{name}' is not one", self.at(*path))
            if name == "lr" and not isinstance(default, float):
                raise SpecError("lr must be a number", self.at(*dpath), "e.g. lr: 1.0e-3")
            if "in" in spec and isinstance(default, bool):
                raise SpecError(f"'{name}' is a bool: it takes no interval", self.doc.key_at(*path, "in"))
            interval = self.interval(spec["in"], path + ("in",)) if "in" in spec else None
            values = default if isinstance(default, tuple) else (default,)
            if interval and not isinstance(default, bool):
                for v in values:
                    if v not in interval:
                        raise SpecError(f"default {v!r} of '{name}' is outside {interval}", self.at(*dpath))
            doc = spec.get("doc", "")
            if not isinstance(doc, str):
                raise SpecError("doc must be text", self.at(*path, "doc"))
            hyper = Hyper(name, default, names, interval, doc, self.doc.key_at(*path))
            for unpacked in names:
                self.bind(Binding(sympy.Symbol(unpacked), Kind.HOST, hyper.is_bool), unpacked)
            hypers.append(hyper)
        if "lr" not in section:
            raise SpecError(
                "a spec needs an 'lr' hyperparameter", self.at("hyper"), "LR schedulers read param_group['lr']"
            )
        return hypers

    def hyper_default(self, value: Any, path: tuple, name: str) -> float | bool | tuple[float, ...]:
        if isinstance(value, bool):
            return value
        if isinstance(value, list):
            if not value or len(value) > 8:
                raise SpecError(f"tuple hyperparameter '{name}' needs 1 to 8 numbers", self.at(*path))
            return tuple(self.number(v, path + (i,), name) for i, v in enumerate(value))
        return self.number(value, path, name)

    def number(self, value: Any, path: tuple, name: str) -> float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):  # YAML 1.1 reads 1e-3 as text
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(
                f"wrong type for '{name}': expected a number, got {type(value).__name__} {value!r}",
                self.at(*path),
                "e.g. 1.0e-3",
            )
        if value != value:
            raise SpecError(f"'{name}' must not be NaN", self.at(*path))
        try:
            return float(value)
        except OverflowError:  # a huge integer
            raise SpecError(f"'{name}' is too large for float64", self.at(*path)) from None

    def tuple_names(self, name: str, names: Any, size: int, path: tuple) -> tuple[str, ...]:
        if names is None:
            stem = name[:-1] if name.endswith("s") else name
            names = [f"{stem}{i + 1}" for i in range(size)]
        elif not isinstance(names, list) or len(names) != size:
            raise SpecError(f"'{name}' has {size} values, so names needs {size} names", self.at(*path, "names"))
        for i, unpacked in enumerate(names):
            self.new_name(unpacked, path + ("names", i), "hyperparameter")
        return tuple(names)

    def interval(self, text: Any, path: tuple) -> Interval:
        match = _INTERVAL.match(text) if isinstance(text, str) else None
        if not match:
            raise SpecError(f"invalid interval {text!r}", self.at(*path), 'write e.g. "[0, 1)" or "[0, inf)"')
        lo, hi = (self.number(match.group(i), path, "interval bound") for i in (2, 3))
        return Interval(lo, hi, match.group(1) == "[", match.group(4) == "]")

    # -- state ---------------------------------------------------------------------------------
    def parse_state(self, section: Any, hypers: list[Hyper]) -> list[StateVar]:
        if not isinstance(section, dict):
            raise SpecError("state must be a mapping of name: {init, store}", self.at("state"))
        state = []
        saved: dict[str, str] = {}
        for name, value in section.items():
            path = ("state", name)
            self.new_name(name, path, "state")
            decl = value if isinstance(value, dict) else {"init": value}
            for key in decl:
                if key not in STATE_KEYS:
                    raise SpecError(
                        f"unknown key '{key}' in state '{name}'",
                        self.doc.key_at(*path, key),
                        "keys: " + ", ".join(sorted(STATE_KEYS)),
                    )
            kind_name = decl.get("kind", "full")
            if not isinstance(kind_name, str) or kind_name not in STATE_KINDS:
                raise SpecError(
                    f"unknown state kind {kind_name!r}", self.at(*path, "kind"), "kinds: " + ", ".join(STATE_KINDS)
                )
            kind = STATE_KINDS[kind_name]
            store = self.storage(decl.get("store", "float32"), path + ("store",))
            if store.quant and kind is not Kind.FULL:
                raise SpecError(f"only full state can be quantized ('{name}' is {kind})", self.at(*path, "store"))
            init, init_kind = self.init_expr(decl.get("init", 0), path + ("init",) if isinstance(value, dict) else path)
            if join_up(init_kind, kind) != kind:
                raise SpecError(f"kind clash: init of {kind} state '{name}' is {init_kind}", self.at(*path))
            saved_as = decl.get("saved_as", name)
            self.identifier(saved_as, path + ("saved_as",), "saved_as")
            if saved_as == "step" or saved_as in saved:
                raise SpecError(f"state key '{saved_as}' is used twice (or is 'step')", self.at(*path, "saved_as"))
            saved[saved_as] = name
            state.append(
                StateVar(name, init, init_kind, store, kind, saved_as, decl.get("doc", ""), self.doc.key_at(*path))
            )
            self.bind(Binding(sympy.Symbol(name), kind), name)
        return state

    def storage(self, value: Any, path: tuple) -> Storage:
        if isinstance(value, str) and value in FLOAT_STORES:
            return Storage(value)
        if isinstance(value, str) and value in Q.PRESETS:
            return Storage("float32", Q.PRESETS[value])
        if not isinstance(value, dict):
            raise SpecError(
                f"unknown storage scheme {value!r}",
                self.at(*path),
                "valid: " + ", ".join([*sorted(FLOAT_STORES), *Q.PRESETS]) + ", or {bits, signed, normalize, table}",
            )
        for key in value:
            if key not in QUANT_KEYS:
                raise SpecError(
                    f"unknown key '{key}' in a quantized store",
                    self.doc.key_at(*path, key),
                    "keys: " + ", ".join(QUANT_KEYS),
                )
        missing = [k for k in QUANT_KEYS if k not in value]
        if missing:
            raise SpecError(
                f"quantized store needs {', '.join(missing)}", self.doc.key_at(*path), "keys: " + ", ".join(QUANT_KEYS)
            )
        bits, signed, normalize, table = (value[k] for k in QUANT_KEYS)
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (4, 8):
            raise SpecError(f"bits must be 4 or 8, got {bits!r}", self.at(*path, "bits"))
        if not isinstance(signed, bool):
            raise SpecError(f"signed must be true or false, got {signed!r}", self.at(*path, "signed"))
        if table not in Q.TABLES:
            raise SpecError(f"unknown table {table!r}", self.at(*path, "table"), "tables: " + ", ".join(Q.TABLES))
        if table == "linear_nozero" and signed:
            raise SpecError("linear_nozero is an unsigned table", self.at(*path, "table"), "use signed: false")
        block = 0
        if isinstance(normalize, dict) and list(normalize) == ["block"]:
            block = normalize["block"]
            if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % 2:
                raise SpecError(
                    f"block size must be a positive even integer (two 4-bit codes per byte), got {block!r}",
                    self.at(*path, "normalize", "block"),
                )
            normalize = "block"
        elif normalize not in ("rank1", "tensor"):
            raise SpecError(
                f"unknown normalization {normalize!r}", self.at(*path, "normalize"), "use {block: B}, rank1 or tensor"
            )
        if normalize == "rank1" and signed:
            raise SpecError(
                "rank-1 normalization needs a non-negative (signed: false) state",
                self.at(*path, "normalize"),
                "use {block: 128} for signed states",
            )
        return Storage("float32", Q.QuantScheme(bits, signed, normalize, table, block))

    def init_expr(self, value: Any, path: tuple) -> tuple[sympy.Expr, Kind]:
        where = self.expression_at(*path)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return E.number(float(value)), Kind.HOST
            except OverflowError:  # .inf, .nan or a huge integer
                raise SpecError(f"init must be a finite float64 number, got {value!r}", where) from None
        allowed = {"param"} | {n for n, b in self.bindings.items() if b.kind is Kind.HOST and n != "step"}

        def resolve(name: str, at: Location) -> Binding:
            if name not in allowed:
                raise SpecError(f"init can use param and hyperparameters, not '{name}'", at)
            return self.bindings[name]

        node = E.parse_expression(str(value), where)
        return E.build_expression(node, resolve, where)

    # -- program -------------------------------------------------------------------------------
    def parse_program(self, defines: Any, update: Any, state: list[StateVar]):
        program: list[Assignment] = []
        if not isinstance(defines, dict):
            raise SpecError("define must be a mapping of name: expression", self.at("define"))
        program += self.parse_defines(defines)
        if not isinstance(update, list) or not update:
            raise SpecError("update must be a non-empty list of statements", self.at("update"), "- m = beta1 * m + ...")
        assigned_later = {}
        parsed = []
        for i, line in enumerate(update):
            where = self.expression_at("update", i)
            if not isinstance(line, str):
                raise SpecError("an update statement must be text like `m = beta1 * m + grad`", where)
            target, target_at, node = E.parse_statement(line, where)
            parsed.append((line, where, target, target_at, node))
            assigned_later.setdefault(target, target_at)

        self.taken = {*self.bindings, *assigned_later} - set(state_by_name_of(state)) - {"param"}
        outputs: dict[str, sympy.Symbol] = {}
        versions: dict[str, int] = {}
        state_by_name = {s.name: s for s in state}
        temporaries: dict[str, Binding] = {}

        for _line, where, target, target_at, node in parsed:

            def resolve(name: str, at: Location) -> Binding:
                if name in temporaries:
                    return temporaries[name]
                if name in self.bindings:
                    return self.bindings[name]
                if name in assigned_later:
                    raise SpecError(
                        f"undefined temporary '{name}': it is used before it is assigned "
                        f"(line {assigned_later[name].line})",
                        at,
                    )
                raise SpecError(f"unknown name '{name}'", at, E.suggest(name, [*self.bindings, *temporaries]))

            value, kind = E.build_expression(node, resolve, where)
            self.check_target(target, target_at, kind, state_by_name)
            versions[target] = versions.get(target, 0) + 1
            symbol = self.version_symbol(target, versions[target], target in state_by_name or target == "param")
            limit = state_by_name[target].kind if target in state_by_name else Kind.FULL
            self.kinds[symbol] = max(kind, limit) if target in state_by_name or target == "param" else kind
            binding = Binding(symbol, self.kinds[symbol])
            temporaries[target] = binding
            text = f"{target} = {ast.unparse(node)}"  # re-printed from the checked tree: no comments
            program.append(Assignment(target, symbol, value, binding.kind, text, where))
            if target in state_by_name or target == "param":
                outputs[target] = symbol

        if "param" not in outputs:
            raise SpecError("the update never assigns param", self.at("update"), "add e.g. `param = param - lr * grad`")
        for s in state:
            if s.name not in outputs:
                raise SpecError(f"state '{s.name}' is declared but never assigned in update", s.where)
        return program, outputs

    def version_symbol(self, target: str, version: int, is_output: bool) -> sympy.Symbol:
        """m -> m_new (then m_new2, ...); a temporary keeps its name, then t_2, ...: never a spec name."""
        if not is_output and version == 1:
            return sympy.Symbol(target)
        if is_output:
            candidates = (f"{target}_new" + (str(version + i) if version + i > 1 else "") for i in range(10**6))
        else:
            candidates = (f"{target}_{version + i}" for i in range(10**6))
        for name in candidates:
            if name not in self.taken:
                self.taken.add(name)
                return sympy.Symbol(name)
        raise AssertionError("unreachable")

    def check_target(self, target: str, at: Location, kind: Kind, state: dict[str, StateVar]) -> None:
        if target == "grad":
            raise SpecError("cannot assign to grad (it is read-only)", at, "assign to a temporary, e.g. g = grad + ...")
        if target == "step":
            raise SpecError("cannot assign to step (the runtime counts steps)", at)
        if target.startswith("__"):
            raise SpecError(f"names starting with '__' are not allowed ({target})", at)
        binding = self.bindings.get(target)
        if binding is not None and target not in state and target != "param":
            what = "a define" if target in self.defines else "a hyperparameter"
            raise SpecError(f"cannot assign to '{target}': it is {what}", at, "assign to a new temporary name instead")
        if (target in RESERVED or _GENERATED_NAME.match(target)) and target != "param":
            raise SpecError(f"'{target}' is reserved", at, "pick another name")
        if target in state and join_up(kind, state[target].kind) != state[target].kind:
            raise SpecError(
                f"kind clash: '{target}' is a {state[target].kind} state but the value is {kind}",
                at,
                "reduce it first, e.g. mean(x, dim=-1) for rows",
            )

    def expression_at(self, *path: Any) -> Location:
        """Where an expression's text starts (after an opening quote, if it is quoted)."""
        return self.doc.expression_at(*path)

    def parse_defines(self, defines: dict[str, Any]) -> list[Assignment]:
        self.defines = defines
        nodes = {}
        for name, text in defines.items():
            path = ("define", name)
            self.new_name(name, path, "define")
            if isinstance(text, (int, float)) and not isinstance(text, bool):
                text = repr(text)
            where = self.expression_at(*path)
            nodes[name] = (E.parse_expression(text, where) if isinstance(text, str) else None, where, str(text))
            if nodes[name][0] is None:
                raise SpecError(f"define '{name}' must be an expression", where)
        order = self.dependency_order(nodes)
        program = []
        for name in order:
            node, where, text = nodes[name]

            def resolve(ref: str, at: Location) -> Binding:
                if ref in self.bindings:
                    return self.bindings[ref]
                raise SpecError(f"unknown name '{ref}'", at, E.suggest(ref, [*self.bindings, *defines]))

            value, kind = E.build_expression(node, resolve, where)
            symbol = sympy.Symbol(name)
            self.bind(Binding(symbol, kind), name)
            text = f"{name} = {ast.unparse(node)}"  # re-printed from the checked tree: no comments
            program.append(Assignment(name, symbol, value, kind, text, where, is_define=True))
        return program

    def dependency_order(self, nodes: dict[str, tuple]) -> list[str]:
        deps = {name: {n.id for n in E.free_names(node) if n.id in nodes} for name, (node, _, _) in nodes.items()}
        order: list[str] = []
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in order:
                return
            if name in visiting:
                cycle = visiting[visiting.index(name) :] + [name]
                raise SpecError("cycle in define: " + " -> ".join(cycle), nodes[name][1])
            visiting.append(name)
            for dep in sorted(deps[name]):
                visit(dep)
            visiting.pop()
            order.append(name)

        for name in nodes:
            visit(name)
        return order

    # -- routing -------------------------------------------------------------------------------
    def parse_routing(self, top: dict) -> Routing | None:
        if ("applies_to" in top) != ("otherwise" in top):
            missing = "otherwise" if "applies_to" in top else "applies_to"
            raise SpecError(
                f"applies_to and otherwise go together; '{missing}' is missing",
                self.doc.key_at("applies_to" if "applies_to" in top else "otherwise"),
            )
        if "applies_to" not in top:
            return None
        where = self.expression_at("applies_to")
        text = top["applies_to"]
        if not isinstance(text, str):
            raise SpecError("applies_to must be a condition such as `ndim >= 2`", where)
        node = E.parse_expression(text, where)
        kinds = {sympy.Symbol(p): Kind.HOST for p in PARAM_PROPERTIES}

        def resolve(name: str, at: Location) -> Binding:
            if name not in PARAM_PROPERTIES:
                raise SpecError(f"applies_to can use {', '.join(PARAM_PROPERTIES)}, not '{name}'", at)
            return Binding(sympy.Symbol(name), kinds[sympy.Symbol(name)])

        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            raise SpecError(
                "applies_to cannot call functions",
                where.shifted(call.col_offset),
                "compare ndim and numel, e.g. numel > 4096",
            )
        condition, _ = E.build_condition(node, resolve, where)  # validates: whitelist, names, a condition
        condition_text = ast.unparse(node)  # re-printed from the checked tree, never the raw text

        other = top["otherwise"]
        rename: dict[str, str] = {}
        if isinstance(other, dict):
            unknown = set(other) - {"spec", "rename"}
            if unknown or "spec" not in other:
                raise SpecError("otherwise takes {spec: NAME, rename: {hyper: keyword}}", self.at("otherwise"))
            rename = other.get("rename", {}) or {}
            other = other["spec"]
            if not isinstance(rename, dict) or not all(
                isinstance(v, str) and v.isidentifier() for v in rename.values()
            ):
                raise SpecError("rename maps hyperparameter names to new keyword names", self.at("otherwise", "rename"))
        if not isinstance(other, str):
            raise SpecError("otherwise names a built-in spec or a spec file", self.at("otherwise"))
        here = Path(self.doc.file).parent if self.doc.file and not self.doc.file.startswith("<") else None
        try:
            path = resolve_spec_path(other, here)
        except SpecError as err:
            raise SpecError(err.message, self.at("otherwise"), err.hint) from None
        key = str(path.resolve())
        if key in self.chain or key == _resolved(self.doc.file):
            raise SpecError(
                f"cycle in otherwise: {other} routes back to a spec already on the chain", self.at("otherwise")
            )
        otherwise = _SpecParser(read_document(path), self.chain + (_resolved(self.doc.file),)).parse()
        for old, new in rename.items():
            if old not in otherwise.hyper_names:
                raise SpecError(f"rename: '{old}' is not a hyperparameter of {otherwise.name}", self.at("otherwise"))
            if new in RESERVED or _GENERATED_NAME.match(new) or new.startswith("_"):
                raise SpecError(
                    f"rename: '{new}' is reserved", self.at("otherwise", "rename", old), "pick another name"
                )
        return Routing(condition_text, condition, otherwise, dict(rename), self.doc.key_at("applies_to"))


def state_by_name_of(state: list[StateVar]) -> dict[str, StateVar]:
    return {s.name: s for s in state}


def divided_states(spec: Spec) -> set[str]:
    """States whose value (old or new, directly or through temporaries) the update divides by."""
    depends: dict[sympy.Symbol, set[str]] = {sympy.Symbol(s.name): {s.name} for s in spec.state}
    divided: set[str] = set()

    def states_in(expr: sympy.Basic) -> set[str]:
        return set().union(*(depends.get(sym, set()) for sym in expr.free_symbols))

    for assignment in spec.program:
        for power in assignment.expr.atoms(sympy.Pow):
            if power.exp.is_Number and power.exp < 0:
                divided |= states_in(power.base)
        depends[assignment.symbol] = states_in(assignment.expr)
    return divided


def warn_zero_point(spec: Spec) -> None:
    for state in spec.state:
        if state.store.quant and state.store.quant.has_zero and state.name in divided_states(spec):
            warnings.warn_explicit(
                f"state '{state.name}' is divided by but its table '{state.store.quant.table}' contains 0: "
                "values that quantize to 0 make the update explode (the zero-point problem); "
                "use a table without zero (linear_nozero or dynamic_exponent_nozero)",
                SpecWarning,
                state.where.file,
                state.where.line,
            )


def _resolved(file: str) -> str:
    return str(Path(file).resolve()) if file and not file.startswith("<") else file


def join_up(kind: Kind, limit: Kind) -> Kind:
    """The kind a value of ``kind`` takes when stored into a slot of ``limit`` (clash if larger)."""
    return E.join_kinds(kind, limit)
