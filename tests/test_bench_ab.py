"""benchmarks/ab.py: two checkouts' workers taking turns on a tiny Llama; a worker that imports
another checkout's qcompile, or fails, is refused; bad options are usage errors."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from archs import small_llama  # noqa: E402
from benchmarks import ab  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ab") / "llama"
    small_llama().save_pretrained(path)
    return path


def run(capsys, *argv):
    ab.main([str(a) for a in argv])
    return capsys.readouterr().out


@pytest.mark.slow  # two workers compiling a tiny Llama: 40 s idle, 2 min on a loaded VM
def test_the_same_checkout_twice_in_lockstep(folder, capsys):
    out = run(capsys, ROOT, ROOT, "--model", folder, "--formats", "w8a8", "--rounds", "2",
              "--decode", "1")
    assert "| w8a8 | checkout |" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| | ")]
    assert [r[2].strip() for r in rows] == [f"0:{ROOT}", f"1:{ROOT}"]
    for row in rows:
        median, low, ratio = (float(row[i]) for i in (3, 4, 5))
        assert 0 < low <= median
        assert ratio > 0
    assert float(rows[0][5]) == 1.0  # the first against itself


def test_a_worker_importing_another_checkout_is_refused(folder, tmp_path):
    # a folder with its own qcompile package and a .venv whose Python imports this checkout's
    fake = tmp_path / "fake"
    (fake / "qcompile").mkdir(parents=True)
    (fake / "qcompile" / "__init__.py").write_text("")
    (fake / ".venv" / "bin").mkdir(parents=True)
    python = fake / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    with pytest.raises(SystemExit, match="imported qcompile from .*not from that checkout"):
        ab.main([str(fake), str(ROOT), "--model", str(folder), "--formats", "nf4",
                 "--rounds", "1", "--decode", "1"])


def test_a_failing_worker_is_refused_with_its_error(tmp_path):
    with pytest.raises(SystemExit, match="the worker in .* failed"):
        ab.main([str(ROOT), str(ROOT), "--model", str(tmp_path / "no-model"), "--formats",
                 "nf4", "--rounds", "1"])


@pytest.mark.parametrize("argv, words", [
    (["--formats", "int3"], "unknown"), ([], "at least two"), (["--rounds", "0"], "at least 1")])
def test_bad_options_are_usage_errors(argv, words, capsys, tmp_path):
    trees = [ROOT] if argv == [] else [ROOT, ROOT]
    with pytest.raises(SystemExit) as e:
        ab.main([str(t) for t in trees] + argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_a_folder_without_qcompile_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ab.main([str(ROOT), str(tmp_path)])
    assert e.value.code == 2 and "not a blockquant checkout" in capsys.readouterr().err
