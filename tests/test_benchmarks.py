"""The benchmark scripts work end to end on a tiny model (the full runs are benchmarks, not tests)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import memory  # noqa: E402
import suite  # noqa: E402
import train_lm  # noqa: E402

TINY = ["--size", "tiny", "--steps", "24", "--batch", "8", "--seq", "64", "--eval-every", "8", "--eval-batches", "2"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_lm_learns_and_plots(tmp_path):
    for optimizer in ("adamw4bit", train_lm.BASELINE):
        run_script(
            "train_lm.py", "--optimizer", optimizer, *TINY, "--lr", "3e-3", "--out", str(tmp_path / f"{optimizer}.csv")
        )
    runs = {}
    for path in sorted(tmp_path.glob("*.csv")):
        meta, rows = train_lm.read_csv(path)
        runs[meta["optimizer"]] = (meta, rows)
        assert [r["step"] for r in rows] == [0, 8, 16, 24]
        assert rows[-1]["tokens"] == 24 * 8 * 64
        # from ~ln(256) = 5.5 nats at initialization, the byte distribution alone gets it well below 4.5
        assert rows[0]["eval_loss"] > 5.0 and rows[-1]["eval_loss"] < 4.5, rows
        assert all(later["eval_loss"] < earlier["eval_loss"] for earlier, later in zip(rows, rows[1:])), rows
        assert int(meta["peak_memory_bytes"]) > 0 and rows[-1]["wall_s"] > 0
    params = int(runs[train_lm.BASELINE][0]["params"])
    # torch.optim.AdamW: two float32 moments per parameter plus one step tensor per parameter tensor
    assert 8 * params < int(runs[train_lm.BASELINE][0]["state_bytes"]) < 8 * params + 4096
    # adamw4bit: the tiny model's big matrices get 4-bit state, so well under AdamW's 8 bytes/param
    assert int(runs["adamw4bit"][0]["state_bytes"]) < 4 * params

    result = run_script(
        "plot.py", *map(str, sorted(tmp_path.glob("*.csv"))), "--out-dir", str(tmp_path), "--prefix", "t"
    )
    for png in ("t_loss.png", "t_state.png"):
        data = (tmp_path / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, png
        assert png in result.stdout

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{suite.BEGIN}\nold\n{suite.END}\n\nafter\n")
    for path in tmp_path.glob("*.csv"):
        path.rename(tmp_path / f"train_tiny_{path.name}")
    text = suite.replace_section(readme.read_text(), suite.render(tmp_path, "tiny", readme))
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "\nold\n" not in text
    assert "| torch.optim.AdamW | 8.0" in text and "| optgen `adamw4bit` |" in text
    assert "| ≤ +1.0%: met |" in text or "| ≤ +1.0%: missed |" in text  # adamw4bit's bar, judged
    assert "![eval loss vs tokens](train_tiny_loss.png)" in text


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended while we looked
            continue
        if text in line:
            found.append(line)
    return found


@pytest.mark.slow
def test_train_lm_on_two_processes_matches_one(tmp_path):
    """--nproc 2: torchrun, gloo, FSDP2, the global batch split across ranks; rank 0 writes the CSV.

    Both runs see the same global batches; FSDP2's averaged reduce-scatter gives the same gradient
    up to float summation order (~1e-7 relative), which a few AdamW steps keep far below the
    tolerance, 1e-4 relative. A wrong split (other data) or unaveraged gradients (double steps)
    moves the losses by ~1e-2.
    """
    tiny = [*TINY[:2], "--steps", "6", "--batch", "8", "--seq", "64", "--eval-every", "3", "--eval-batches", "2"]
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}.csv"
        run_script(
            "train_lm.py", "--optimizer", "adamw", *tiny, "--threads", "1", "--nproc", str(nproc), "--out", str(out)
        )
    assert not processes_mentioning(str(tmp_path)), "ranks left running"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nproc1.csv", "nproc2.csv"]
    (meta1, one), (meta2, two) = (train_lm.read_csv(tmp_path / f"nproc{n}.csv") for n in (1, 2))
    assert meta1["nproc"] == "1" and meta2["nproc"] == "2" and meta1["params"] == meta2["params"]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 3, 6]
    assert one[-1]["eval_loss"] < one[0]["eval_loss"] - 0.3  # it trained
    for a, b in zip(one, two):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4), (one, two)
        if a["step"]:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), (one, two)


def test_memory_puts_embedding_and_head_on_the_fallback_for_param_groups():
    rows = {r["spec"]: r for r in memory.predicted_rows(["adamw", "swan"], ["llama-60m"])}
    assert sorted(rows) == ["adamw", "swan", "swan, param_groups"]  # only a routed spec gets the variant
    hidden, _, layers, vocab = 512, 1376, 8, 32000  # LLaMA-60M (GaLore's config)
    n_tensors = 2 + 9 * layers + 1
    adamw_floats = 2 * vocab * hidden + (2 * layers + 1) * hidden  # embedding, head, norms: m and v each
    state = rows["swan, param_groups"]["state_GiB"] * 1024**3
    assert 8 * adamw_floats <= state <= 8 * adamw_floats + 16 * n_tensors  # + at most a step counter each
    assert rows["swan"]["state_GiB"] * 1024**3 < 8 * (2 * layers + 1) * hidden + 16 * n_tensors


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [train_lm.lr_at(step, 1.0, warmup=10, total=100) for step in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)


def test_corpus_split_is_fixed_and_disjoint():
    train, held_out = train_lm.stdlib_corpus()
    again_train, again_held_out = train_lm.stdlib_corpus()
    assert train.numel() > 4 * held_out.numel() > 0
    assert train.equal(again_train) and held_out.equal(again_held_out)
    assert int(train.max()) < 256


def test_steps_to_reach_reports_the_first_evaluation_at_or_below_the_target():
    rows = [{"step": s, "eval_loss": v} for s, v in [(0, 5.0), (10, 3.0), (20, 2.0), (30, 1.5)]]
    assert suite.steps_to_reach(rows, 2.0) == 20
    assert suite.steps_to_reach(rows, 1.0) is None


@pytest.mark.slow
def test_shapes_cpu_writes_the_table_the_readme_shows(tmp_path):
    run_script("shapes_cpu.py", "--elements", "20000", "--rounds", "2", "--out-dir", str(tmp_path))
    lines = (tmp_path / "shapes_cpu.csv").read_text().splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert {r["implementation"] for r in rows} >= {"torch.optim.AdamW fused", "optgen adamw4bit (mlir)"}
    assert all(float(r["ns_per_element"]) > 0 for r in rows)
    assert {r["ratio_to_fused"] for r in rows if r["implementation"] == "torch.optim.AdamW fused"} == {"1.00"}
    table = suite.shapes_table(tmp_path / "shapes_cpu.csv")
    assert "| conv 3×3 (256, 256, 3, 3) × 1 | " in table and "| LoRA B (4096, 16) × 1 | " in table
    assert table.count("\n| ") == len({r["shape"] for r in rows})  # one row per shape, after the header


def test_replace_section_without_markers_names_them():
    with pytest.raises(SystemExit, match="results markers"):
        suite.replace_section("# no markers\n", "x")


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--batch", "6", "--nproc", "4"])  # the global batch is split evenly
    model = train_lm.Decoder(train_lm.ModelConfig(16, 1, 2, 32), seq_len=8)
    with pytest.raises(SystemExit, match="cannot load optimizer 'no_such_spec'"):
        train_lm.make_optimizer("no_such_spec", model, 1e-3, 0.0, "auto")
    with pytest.raises(SystemExit, match="NAME=NUMBER"):
        train_lm.parse_hyper(["alpha"])
    assert train_lm.parse_hyper(["alpha=0.5", "eps=1e-6"]) == {"alpha": 0.5, "eps": 1e-6}
    with pytest.raises(SystemExit, match=r"--hyper beta not accepted by 'torch-adamw'; valid: .*amsgrad"):
        train_lm.make_optimizer(train_lm.BASELINE, model, 1e-3, 0.0, "auto", hyper={"beta": 0.9})
    assert (
        train_lm.make_optimizer(train_lm.BASELINE, model, 1e-3, 0.0, "auto", hyper={"eps": 1e-6}).defaults["eps"]
        == 1e-6
    )
