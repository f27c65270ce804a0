"""The command line: help, list, check (exit codes and one-line errors), show and build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optgen.cli import EXIT_SPEC_ERROR, main
from optgen.codegen.spec import builtin_specs, load_spec

SUBCOMMANDS = ("build", "check", "list", "show")
BAD_SPEC = """\
optgen: 1
name: bad
class: Bad
hyper:
  lr: 0.1
update:
  - param = param - lr * sqrtt(grad)
"""


def optgen_command() -> list[str]:
    """The venv's `optgen` script when installed next to this interpreter, else `python -m optgen.cli`."""
    script = Path(sys.executable).parent / "optgen"
    return [str(script)] if script.exists() else [sys.executable, "-m", "optgen.cli"]


def run_optgen(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*optgen_command(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=dict(os.environ)
    )


@pytest.fixture
def bad_spec(tmp_path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_SPEC)
    return path


# -- help -----------------------------------------------------------------------------------------


def test_help_exits_zero_in_a_subprocess():
    result = run_optgen("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: optgen")
    for command in SUBCOMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("args", [["--help"], ["-h"], *[[command, "--help"] for command in SUBCOMMANDS]])
def test_every_help_exits_zero(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: optgen")
    if args[0] in SUBCOMMANDS:
        assert f"optgen {args[0]}" in out


def test_subcommand_help_describes_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    out = capsys.readouterr().out
    assert "--torch" in out and "--plan" in out
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert "--output" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: optgen" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# -- list -----------------------------------------------------------------------------------------


def test_list_prints_every_builtin_with_its_bytes_per_param(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "class"] and "B/param" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(builtin_specs())
    for name, path in builtin_specs().items():
        spec = load_spec(path)
        row = rows[name]
        assert row[1] == spec.class_name
        assert float(row[2]) == pytest.approx(spec.state_bytes_per_element(), abs=0.01)
        assert spec.summary.split()[0] in row[3:]


def test_list_known_bytes():
    """Plain float32 states: AdamW keeps two (8 B/param), SGD and Lion one (4 B/param)."""
    result = run_optgen("list")
    assert result.returncode == 0 and result.stderr == ""
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert float(rows["adamw"][2]) == 8
    assert float(rows["adam"][2]) == 8
    assert float(rows["sgd"][2]) == 4
    assert float(rows["lion"][2]) == 4


# -- check ----------------------------------------------------------------------------------------


def test_check_builtins_ok(capsys):
    names = list(builtin_specs())
    assert main(["check", *names]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(names)
    for name, line in zip(names, out, strict=True):
        assert line.startswith(f"{name}: ok (")


def test_check_bad_spec_subprocess(bad_spec):
    result = run_optgen("check", str(bad_spec))
    assert result.returncode == EXIT_SPEC_ERROR == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2
    assert lines[0].startswith(f"optgen: error: {bad_spec}:7:")
    assert "unknown function 'sqrtt'" in lines[0] and "did you mean 'sqrt'?" in lines[0]


def test_check_bad_spec_column(bad_spec, capsys):
    assert main(["check", str(bad_spec)]) == 2
    err = capsys.readouterr().err
    column = "  - param = param - lr * sqrtt(grad)".index("sqrtt") + 1
    assert err == f"optgen: error: {bad_spec}:7:{column}: unknown function 'sqrtt' (did you mean 'sqrt'?)\n"


def test_check_stops_at_the_first_bad_spec(bad_spec, capsys):
    assert main(["check", "adamw", str(bad_spec), "sgd"]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["adamw: ok (AdamW)"]
    assert "sgd" not in captured.out


def test_check_missing_file(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("optgen: error: no spec file or built-in spec named")
    assert "built-in specs: adam" in err


def test_check_yaml_error_and_binary_file(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optgen: 1\nname adamw\nclass: X\n")
    assert main(["check", str(broken)]) == 2
    assert f"{broken}:2:1: YAML syntax error" in capsys.readouterr().err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["check", str(binary)]) == 2
    assert f"{binary}:1:1: spec is not UTF-8 text" in capsys.readouterr().err


def test_check_refuses_injection_without_running_it(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    spec = tmp_path / "evil.yaml"
    spec.write_text(BAD_SPEC.replace("sqrtt(grad)", f"__import__('os').system('touch {sentinel}')"))
    result = run_optgen("check", str(spec))
    assert result.returncode == 2
    assert "only library functions can be called" in result.stderr and "Traceback" not in result.stderr
    assert not sentinel.exists()


# -- show -----------------------------------------------------------------------------------------


def test_show_plan(capsys):
    assert main(["show", "adamw"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan for AdamW")
    assert "state: m [full, float32], v [full, float32]" in out
    assert "host (once per parameter per step):" in out
    assert "stage map_0" in out
    assert "store: m <- m_new, v <- v_new, param <- param_new" in out
    capsys.readouterr()
    assert main(["show", "adamw", "--plan"]) == 0
    assert capsys.readouterr().out == out


def test_show_torch_is_python(capsys):
    assert main(["show", "adamw", "--torch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Generated by optgen")
    assert "import torch" in out and "def update(" in out
    compile(out, "adamw_kernels.py", "exec")  # the printed kernels are valid Python


def test_show_subprocess_and_mutually_exclusive_flags():
    result = run_optgen("show", "sgd")
    assert result.returncode == 0 and result.stdout.startswith("plan for SGD")
    result = run_optgen("show", "sgd", "--plan", "--torch")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_show_bad_spec(bad_spec, capsys):
    assert main(["show", str(bad_spec)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{bad_spec}:7:" in captured.err


# -- build ----------------------------------------------------------------------------------------


def test_build_writes_a_package(tmp_path, capsys):
    assert main(["build", "adamw", "-o", str(tmp_path / "out")]) == 0
    assert "adamw ->" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "adamw" / "manifest.json").read_text())
    assert manifest["class"] == "AdamW"


def test_build_bad_spec_writes_nothing(bad_spec, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", str(bad_spec), "-o", str(out)]) == 2
    assert f"{bad_spec}:7:" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
