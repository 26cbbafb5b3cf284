"""The command line: every --help, one-line errors for user mistakes, run folders never replaced,
and the train -> export -> bench path."""

from __future__ import annotations

import json
import os

import pytest

from moduli_transform.cli import build_parser, main

SUBCOMMANDS = ("bench", "demo", "export", "inspect", "table", "train")


def _call(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_help_is_clean(command, capsys):
    status, out, _ = _call([command, "--help"], capsys)
    assert status == 0
    assert "option_strings" not in out and "usage:" in out


def test_top_level_help_lists_every_command(capsys):
    help_text = build_parser().format_help()
    assert "option_strings" not in help_text
    assert all(command in help_text for command in SUBCOMMANDS)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return str(path)


BAD = [
    (["train", "adding", "--preset", "test", "--manifold", "tours"], "unknown manifold 'tours'"),
    (["train", "adding", "--preset", "test", "--inhibitor", "doggo"], "unknown inhibitor 'doggo'"),
    (["train", "adding", "--preset", "test", "--sparsity", "1.5"], "sparsity"),
    (["train", "adding", "--preset", "test", "--seed", "-1"], "seed"),
    (["train", "adding", "--preset", "test", "--steps", "1"], "steps"),
    (["train", "language_model", "--preset", "test", "--data", "no/such/corpus.txt"], "no such file"),
    (["train", "adding", "--preset", "test", "--out", "{file}"], "is a file"),
    (["train", "adding", "--preset", "test", "--resume", "--overwrite"], "contradict"),
    (["table", "adding", "--preset", "test", "--seeds", "0"], "--seeds"),
    (["table", "adding", "--preset", "test", "--sparsities", "1.5"], "--sparsities"),
    (["bench", "--hidden", "0"], "--hidden"),
    (["bench", "--sparsity", "1.5"], "--sparsity"),
    (["bench", "--file", "no/such.safetensors"], "no such file"),
    (["export", "--model", "no_such_file.py:make", "--safetensors", "x.safetensors"], "no_such_file.py"),
    (["export", "--state", "no/such.safetensors", "--model", "torch.nn:Identity", "--safetensors", "x.st"],
     "no such file"),
    (["inspect", "{models}:make", "--input-shape", "2,3,5"], "fails on inputs of shape 2x3x5"),
    (["export", "--run", "no/such/run", "--safetensors", "x.safetensors"], "not a finished run folder"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:3]) + "|" + m for a, m in BAD])
def test_user_mistakes_are_one_line_and_exit_2(argv, message, a_file, tmp_path, capsys):
    models = tmp_path / "gru_models.py"
    models.write_text("import torch\n\ndef make():\n    return torch.nn.GRU(8, 16, batch_first=True)\n")
    argv = [part.replace("{file}", a_file).replace("{models}", str(models)) for part in argv]
    status, _, err = _call(argv, capsys)
    assert status == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err


TRAIN = ["train", "adding", "--preset", "test", "--steps", "6", "--sparsity", "0.5", "--no-progress", "--threads", "1",
         "--device", "cpu"]


def test_existing_run_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "r1"
    status, _, err = _call(TRAIN + ["--out", str(out), "--resume"], capsys)
    assert status == 0 and "starting a fresh run" in err and f"run folder: {out}" in err
    assert f"run written to {out}" in err
    first = (out / "summary.json").read_text()

    status, _, err = _call(TRAIN + ["--out", str(out), "--seed", "1"], capsys)
    assert status == 2 and "--resume" in err and "--overwrite" in err and f"{out}-2" in err
    assert (out / "summary.json").read_text() == first

    status, _, err = _call(TRAIN + ["--out", str(out), "--seed", "1", "--resume"], capsys)
    assert status == 2 and "seed" in err and len(err.strip().splitlines()) == 1

    status, _, err = _call(TRAIN + ["--out", str(out), "--seed", "1", "--overwrite"], capsys)
    assert status == 0 and "aside" in err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("r1.old-")]
    assert len(moved) == 1 and (moved[0] / "summary.json").read_text() == first
    assert json.loads((out / "summary.json").read_text())["seed"] == 1


def test_table_refuses_a_run_folder_with_another_run(tmp_path, capsys):
    out = tmp_path / "table"
    assert _call(TRAIN + ["--out", str(out / "moduli-s0.5-seed0"), "--seed", "3"], capsys)[0] == 0
    before = (out / "moduli-s0.5-seed0" / "summary.json").read_text()
    status, _, err = _call(["table", "adding", "--preset", "test", "--seeds", "1", "--sparsities", "0.5",
                            "--steps", "6", "--out", str(out)], capsys)
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "moduli-s0.5-seed0 holds another run (other lottery, seed)" in err
    assert (out / "moduli-s0.5-seed0" / "summary.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["moduli-s0.5-seed0"]  # nothing trained


def test_train_export_bench_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README runs these with relative paths
    out = tmp_path / "run"
    assert _call(TRAIN + ["--out", str(out)], capsys)[0] == 0
    exported = tmp_path / "pruned.safetensors"
    status, stdout, err = _call(["export", "--run", str(out), "--safetensors", str(exported)], capsys)
    assert status == 0, err
    assert exported.is_file() and "CSR" in stdout
    status, stdout, err = _call(["export", "torch.nn:Identity", "--state", str(out / "weights.safetensors"),
                                 "--safetensors", str(tmp_path / "x.safetensors")], capsys)
    assert status == 2 and "Traceback" not in err  # weights of another model: one line
    # a relative --file: the timing workers run in another directory
    status, stdout, err = _call(["bench", "--file", "pruned.safetensors", "--batch", "1", "--steps", "5", "--rounds",
                                 "1", "--repeats", "1", "--libraries", "torch_rnn", "ours", "--threads", "1",
                                 "--device", "cpu", "--out", "bench"], capsys)
    assert status == 0, err
    assert "|" in stdout and any((tmp_path / "bench").iterdir())
    # a second benchmark into the same folder refuses before timing anything, files untouched
    bench = ["bench", "--file", str(exported), "--batch", "1", "--steps", "5", "--rounds", "1", "--repeats", "1",
             "--libraries", "torch_rnn", "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "bench")]
    before = {path.name: path.read_bytes() for path in (tmp_path / "bench").iterdir()}
    status, stdout, err = _call(bench, capsys)
    assert status == 2 and "earlier benchmark" in err and "--overwrite" in err and stdout == ""
    assert {path.name: path.read_bytes() for path in (tmp_path / "bench").iterdir()} == before
    status, stdout, err = _call(bench + ["--overwrite"], capsys)
    assert status == 0, err
    replaced = (tmp_path / "bench" / "bench.md").read_text()
    assert "torch_rnn" in replaced and "| ours |" not in replaced
    assert sorted(path.name for path in (tmp_path / "bench").iterdir()) == ["bench.csv", "bench.md", "bench.png"]


def test_export_accepts_a_py_file_factory(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_models.py").write_text("import torch\n\ndef make():\n    return torch.nn.GRU(2, 4)\n")
    monkeypatch.chdir(tmp_path)
    status, stdout, err = _call(["export", "--model", "my_models.py:make", "--safetensors", "gru.safetensors"], capsys)
    assert status == 0, err
    assert (tmp_path / "gru.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_demo_quick_has_its_own_folder_and_refuses_a_foreign_run(tmp_path, capsys, monkeypatch):
    from moduli_transform.tasks.demo import register, run_demo
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "runs" / "demo-quick" / "moduli"
    foreign.mkdir(parents=True)
    (foreign / "summary.json").write_text("{}")
    status = run_demo(parser.parse_args(["demo", "--quick"]))
    err = capsys.readouterr().err
    assert status == 2 and "runs/demo-quick/moduli holds another run" in err and "--fresh" in err
    assert len(err.strip().splitlines()) == 1
    assert (foreign / "summary.json").read_text() == "{}"
    assert not (tmp_path / "runs" / "demo").exists()


@pytest.mark.slow
def test_wheel_installs_no_top_level_tasks_or_export(tmp_path):
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
                   check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("moduli_transform-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"moduli_transform"}
    assert "moduli_transform/tasks/run_folder.py" in names and "moduli_transform/export/onnx_export.py" in names
