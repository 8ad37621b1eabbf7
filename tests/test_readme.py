"""The README's Python examples, exactly as written, each in a fresh interpreter from the
checkout's root (as a newcomer pastes them), under grad mode as written."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_the_examples_this_file_runs():
    assert len(BLOCKS) == 2
    assert "qcompile.quantize(" in BLOCKS[0] and "qcompile.compile(model, policy)" in BLOCKS[1]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=["tensor", "model"])
def test_readme_example_runs_as_written(index):
    if "smollm2_folder" in BLOCKS[index]:
        data = pytest.importorskip("benchmarks.data")
        try:
            data.smollm2_folder()  # converted once into .cache/ (the packaged model)
        except SystemExit as e:  # the model package is not installed
            pytest.skip(str(e))
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    if index == 1:
        # explain(compiled) printed rows for the layers the policy names, after a generate
        assert "self_attn.q_proj" in done.stdout and "mxint8" in done.stdout
        assert "bof4s_opq" in done.stdout and "total:" in done.stdout
        # the tied embedding / lm_head share one packed table: the model shrinks, nothing warns
        # of a split pair, and each summary compares with the model's float32 truthfully
        before, after = map(int, re.search(r"weights: (\d+) -> (\d+) bytes",
                                           done.stdout).groups())
        assert after < before / 3, (before, after)
        assert "shared one weight (tied)" not in done.stderr
        totals = [line for line in done.stdout.splitlines() if line.startswith("total:")]
        assert len(totals) == 2 and all("x denser than float32" in t for t in totals)
        # once the model ran, the kernels: the generated CPU kernels on this float32 model
        head = [line for line in done.stdout.splitlines() if line.startswith("module")][-1]
        assert "kernel" in head and "cpu (" in done.stdout
