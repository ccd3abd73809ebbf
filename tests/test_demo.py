"""The first command's demo: setup.sh ends with it; it runs all three tasks in seconds and
says plainly that the weights are random."""

from __future__ import annotations

from pathlib import Path

from training.cli import main
from training.demo import QUERY

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_every_task_and_says_the_weights_are_random(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    for task in ("dvc", "mr", "vhd"):
        assert f"\n{task}" in out
    assert f"query: '{QUERY}'" in out and "WEIGHTS ARE RANDOM" in out
    assert (tmp_path / "d" / "tiny" / "model.safetensors").is_file()
    assert (tmp_path / "d" / "clip.mp4").stat().st_size > 0
    for task in ("dvc", "mr", "vhd"):  # each answer's timeline, with the clip's 8 frames
        page = (tmp_path / "d" / f"{task}.html").read_text()
        assert page.count('class="thumb"') == 8 and 'src="clip.mp4"' in page
    # A second run reuses the checkpoint (make-checkpoint would refuse to overwrite it).
    weights = (tmp_path / "d" / "tiny" / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--out", str(tmp_path / "d"), "--max-new-tokens", "4"]) == 0
    assert (tmp_path / "d" / "tiny" / "model.safetensors").stat().st_mtime_ns == weights


def test_setup_runs_the_demo():
    setup = (ROOT / "setup.sh").read_text()
    assert "-m training demo" in setup
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "./setup.sh" in first_block and "demo" in first_block
    assert ".venv/bin/python -m pytest -q" in first_block
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith(".venv/bin/python -m pytest -q")  # the README's test command
