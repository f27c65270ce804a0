"""`optgen build | check | list | show | memory | autotune` — the command line."""

from __future__ import annotations

import argparse
import sys

from optgen.codegen.source import SpecError

EXIT_SPEC_ERROR = 2


def _cmd_check(args: argparse.Namespace) -> int:
    from optgen.codegen.plan import make_plan
    from optgen.codegen.spec import load_spec

    for path in args.specs:
        spec = load_spec(path)
        for sub in spec.all_specs():
            make_plan(sub)
        print(f"{path}: ok ({spec.class_name})")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from optgen.codegen.build import build

    for path in args.specs:
        package = build(path, args.output)
        print(f"{path} -> {package}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from optgen.codegen.spec import builtin_specs, load_spec

    rows = []
    for name, path in builtin_specs().items():
        spec = load_spec(path)
        rows.append((name, spec.class_name, f"{spec.state_bytes_per_element():.2f}", spec.summary.splitlines()[0]))
    header = ("name", "class", "state B/param", "summary")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from optgen.codegen.build import header
    from optgen.codegen.emit_torch import emit_torch
    from optgen.codegen.plan import make_plan
    from optgen.codegen.spec import load_spec

    spec = load_spec(args.spec)
    for sub in spec.all_specs():
        plan = make_plan(sub)
        if args.triton:
            from optgen.codegen.emit_triton import emit_triton

            source = emit_triton(plan, header(sub))
            print(source or f"# {sub.name}: the triton backend declines this plan (the torch kernels run it)")
        elif args.mlir:
            from optgen.codegen.emit_mlir import mlir_modules

            for variant, text in mlir_modules(plan).items():
                print(
                    text
                    if variant == "unsupported"
                    else f"// {sub.name}, variant {variant} (param dtype-layout[-instruction set])\n{text}"
                )
        else:
            print(emit_torch(plan, header(sub)) if args.torch else plan.render())
    return 0


def _cmd_autotune(args: argparse.Namespace) -> int:
    from optgen.runtime import autotune

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        rows = autotune.tune_spec(args.spec, args.sizes, progress=progress)
    except RuntimeError as err:
        print(f"optgen: error: {err}", file=sys.stderr)
        return 1
    print(f"{'device':<28} {'kernel':<10} {'bucket':>7} {'numel':>12} {'BLOCK':>6} {'warps':>5} {'stages':>6}")
    for device, _, kernel, numel, config in rows:
        print(
            f"{device:<28} {kernel:<10} {'2^' + str(autotune.size_bucket(numel)):>7} {numel:>12} "
            f"{config['BLOCK']:>6} {config['num_warps']:>5} {config['num_stages']:>6}"
        )
    print(f"saved to {autotune.user_table_path()}")
    return 0


def _count(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (1 <= value < 2**40) or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole element count such as 4096 or 1e6, got {text!r}")
    return int(value)


def _cmd_memory(args: argparse.Namespace) -> int:
    from optgen.codegen.spec import load_spec
    from optgen.memory import MODELS, model_shapes, parse_shapes, state_memory  # noqa: F811

    if args.model:
        if args.model not in MODELS:
            print(f"optgen: error: unknown model {args.model!r} (known: {', '.join(MODELS)})", file=sys.stderr)
            return EXIT_SPEC_ERROR
        shapes, label = model_shapes(args.model), args.model
    elif args.shapes:
        try:
            shapes, label = parse_shapes(args.shapes), args.shapes
        except ValueError as err:
            print(f"optgen: error: {err}", file=sys.stderr)
            return EXIT_SPEC_ERROR
    else:
        shapes, label = [(args.params,)], f"one tensor of {args.params} elements"
    print(f"{'spec':16s} {'params':>14s} {'state':>12s} {'bytes/param':>12s}   ({label})")
    for path in args.specs:
        spec = load_spec(path)
        m = state_memory(spec, shapes)
        print(f"{spec.name:16s} {m['params']:14,d} {_human(m['state_bytes']):>12s} {m['bytes_per_param']:12.3f}")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def parser() -> argparse.ArgumentParser:
    from optgen.memory import MODELS

    top = argparse.ArgumentParser(prog="optgen", description="A compiler for deep-learning optimizers.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="generate a package per spec", description="Generate DIR/<name>/ per spec.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec file or built-in name (see `optgen list`)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.set_defaults(run=_cmd_build)

    p = sub.add_parser("check", help="validate specs", description="Validate specs; exit 2 on the first error.")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.set_defaults(run=_cmd_check)

    p = sub.add_parser("list", help="list built-in specs", description="Built-in specs, state bytes per param.")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser(
        "memory", help="predicted optimizer-state memory", description="Predicted optimizer-state bytes per spec."
    )
    p.add_argument("specs", nargs="+", metavar="SPEC")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--params", type=int, default=16_777_216, help="one tensor of N elements (default 4096^2)")
    shape.add_argument("--shapes", help="parameter shapes, e.g. 4096x4096,11008x4096,4096")
    shape.add_argument("--model", help="a LLaMA-shaped config: " + ", ".join(MODELS))
    p.set_defaults(run=_cmd_memory)

    p = sub.add_parser(
        "autotune",
        help="tune the Triton kernels' launch configurations",
        description="Tune the Triton kernels of SPEC on this GPU and save the table in the user cache.",
    )
    p.add_argument("spec", metavar="SPEC")
    p.add_argument(
        "--sizes", nargs="+", type=_count, default=[2**20, 2**24, 2**27], help="element counts (default 2^20 2^24 2^27)"
    )
    p.set_defaults(run=_cmd_autotune)

    p = sub.add_parser("show", help="print a spec's plan or generated code", description="Print the plan (default).")
    p.add_argument("spec", metavar="SPEC")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--plan", action="store_true", help="the plan: host scalars, stages (default)")
    what.add_argument("--torch", action="store_true", help="the generated torch kernels")
    what.add_argument("--triton", action="store_true", help="the generated Triton kernels")
    what.add_argument("--mlir", action="store_true", help="the generated MLIR (linalg/scf over memrefs), per variant")
    p.set_defaults(run=_cmd_show)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except SpecError as err:
        print(f"optgen: error: {err}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    except BrokenPipeError:  # `optgen show ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
