"""The team entry of an MLIR kernel function: the whole parallel launch in native code.

Every kernel function ``@F`` gets ``@F_team(%data: !llvm.ptr)``.  The runtime writes F's arguments
into one block of 8-byte words and hands ``F_team`` to OpenMP (``GOMP_parallel``, torch's own team);
each thread claims pieces of [0, count) with an atomic add until none are left and calls ``@F`` on
each.  No Python runs on the worker threads: a launch costs a few microseconds, not the tens a
Python callback per thread took (the GIL passed between threads on every piece).

Data words: 0 the claim counter (starts at 0), 1 the number of pieces, 2 count, then F's arguments
after lo/hi in order: an index, f32 (low 4 bytes) or f64 in one word; a memref as two (address of
element 0, length).  How a piece reaches F:
- F(%lo: index, %hi: index, ...): the piece's [lo, hi) is passed; memrefs are whole;
- otherwise (element-wise linalg maps): every memref is sliced to the piece's elements;
- memrefs named in ``per_piece``: piece p gets elements [p * length, (p + 1) * length), its own
  partial results (statistics merged by the caller).
"""

from __future__ import annotations

import re

_DESCRIPTOR = "!llvm.struct<(ptr, ptr, i64, array<1 x i64>, array<1 x i64>)>"
_ARG = re.compile(r"%([\w.]+): (index|f32|f64|memref<\?x(\w+)>)$")


def with_teams(functions: list[dict]) -> list[dict]:
    """The module's kernel functions, each with its team entry (``team``: lines after it)."""
    return [{**f, "team": team_function(f["name"], f["args"], f.get("per_piece", frozenset()))} for f in functions]


def team_function(name: str, args: list[str], per_piece: frozenset[str] = frozenset()) -> list[str]:
    """The lines of ``@{name}_team`` for a kernel ``@{name}`` taking ``args`` ("%x: type" each)."""
    parsed = []
    for arg in args:
        match = _ARG.match(arg)
        if match is None:
            raise ValueError(f"kernel {name}: argument {arg!r} has no team encoding (index, f32, f64, 1-D memref)")
        parsed.append((match.group(1), match.group(2), match.group(3)))
    ranged = [(a[0][-2:], a[1]) for a in parsed[:2]] == [("lo", "index"), ("hi", "index")]
    rest = parsed[2:] if ranged else parsed
    out = [f"  func.func @{name}_team(%data: !llvm.ptr) attributes {{llvm.emit_c_interface}} {{"]

    def op(text: str, indent: int = 4) -> None:
        out.append(" " * indent + text)

    def word(index: int, var: str, type_: str) -> None:
        op(f"%{var}_at = llvm.getelementptr %data[{index}] : (!llvm.ptr) -> !llvm.ptr, i64")
        op(f"%{var} = llvm.load %{var}_at : !llvm.ptr -> {type_}")

    op("%t_one = arith.constant 1 : i64")
    op("%t_zero = arith.constant 0 : i64")
    word(1, "t_pieces", "i64")
    word(2, "t_count", "i64")
    at = 3
    for var, type_, element in rest:
        if element is None:
            word(at, f"w_{var}", "i64" if type_ == "index" else type_)
            if type_ == "index":
                op(f"%a_{var} = arith.index_cast %w_{var} : i64 to index")
            at += 1
        else:
            word(at, f"p_{var}", "!llvm.ptr")
            word(at + 1, f"n_{var}", "i64")
            at += 2
    out.append("    %t_last = scf.while : () -> i64 {")
    op("%t_p = llvm.atomicrmw add %data, %t_one monotonic : !llvm.ptr, i64", 6)
    op("%t_more = arith.cmpi slt, %t_p, %t_pieces : i64", 6)
    op("scf.condition(%t_more) %t_p : i64", 6)
    out.append("    } do {")
    out.append("    ^bb0(%p: i64):")
    op("%t_from = arith.muli %t_count, %p : i64", 6)
    op("%t_lo = arith.divui %t_from, %t_pieces : i64", 6)
    op("%t_next = arith.addi %p, %t_one : i64", 6)
    op("%t_to = arith.muli %t_count, %t_next : i64", 6)
    op("%t_hi = arith.divui %t_to, %t_pieces : i64", 6)
    op("%t_len = arith.subi %t_hi, %t_lo : i64", 6)
    values, types = [], []
    if ranged:
        op("%a_lo = arith.index_cast %t_lo : i64 to index", 6)
        op("%a_hi = arith.index_cast %t_hi : i64 to index", 6)
        values += ["%a_lo", "%a_hi"]
        types += ["index", "index"]
    for var, type_, element in rest:
        types.append(type_)
        if element is None:
            values.append(f"%a_{var}" if type_ == "index" else f"%w_{var}")
            continue
        if var in per_piece:
            first, length = f"%s_{var}", f"%n_{var}"
            op(f"{first} = arith.muli %p, %n_{var} : i64", 6)
        elif ranged:
            first, length = "%t_zero", f"%n_{var}"
        else:
            first, length = "%t_lo", "%t_len"
        op(f"%e_{var} = llvm.getelementptr %p_{var}[{first}] : (!llvm.ptr, i64) -> !llvm.ptr, {element}", 6)
        op(f"%d0_{var} = llvm.mlir.undef : {_DESCRIPTOR}", 6)
        op(f"%d1_{var} = llvm.insertvalue %e_{var}, %d0_{var}[0] : {_DESCRIPTOR}", 6)
        op(f"%d2_{var} = llvm.insertvalue %e_{var}, %d1_{var}[1] : {_DESCRIPTOR}", 6)
        op(f"%d3_{var} = llvm.insertvalue %t_zero, %d2_{var}[2] : {_DESCRIPTOR}", 6)
        op(f"%d4_{var} = llvm.insertvalue {length}, %d3_{var}[3, 0] : {_DESCRIPTOR}", 6)
        op(f"%d5_{var} = llvm.insertvalue %t_one, %d4_{var}[4, 0] : {_DESCRIPTOR}", 6)
        op(f"%m_{var} = builtin.unrealized_conversion_cast %d5_{var} : {_DESCRIPTOR} to {type_}", 6)
        values.append(f"%m_{var}")
    op(f"func.call @{name}({', '.join(values)}) : ({', '.join(types)}) -> ()", 6)
    op("scf.yield", 6)
    out.append("    }")
    out.append("    return")
    out.append("  }")
    return out
