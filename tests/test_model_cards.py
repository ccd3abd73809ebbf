"""Model cards of the released checkpoints: read from the config (or --preset), never from
a directory name; `trace-rt run` takes its defaults from them; docs list the same table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trace_rt.errors import InputError
from trace_rt.model_cards import MODEL_CARDS, card_from_config, markdown_table, resolve_card

DOCS = Path(__file__).resolve().parents[1] / "docs" / "model-cards.md"


def test_cards_come_from_the_config_only():
    assert card_from_config({"trace_rt_preset": "trace-uni"}).name == "trace-uni"
    assert card_from_config({"_name_or_path": "Yongxin-Guo/trace-retrieval"}).timestamps == (
        "frames"
    )
    # A local path that merely ends in a release's name is not a claim about the weights.
    assert card_from_config({"_name_or_path": "/data/ckpt/trace-retrieval"}) is None
    assert card_from_config({}) is None
    with pytest.raises(InputError, match="unknown model card 'trace-unii'"):
        card_from_config({"trace_rt_preset": "trace-unii"})


def test_release_facts():
    assert set(MODEL_CARDS) == {
        "trace", "trace-uni", "trace-retrieval",
        "trace-ft-charades", "trace-ft-youcook2", "trace-ft-qvhighlights",
    }  # fmt: skip
    for card in MODEL_CARDS.values():
        assert (card.template, card.frames, card.temperature) == ("llama_2", 128, 0.0)
        assert card.timestamps == ("frames" if card.name == "trace-retrieval" else "free")
    assert "qa" in MODEL_CARDS["trace-uni"].tasks


def test_docs_hold_the_table():
    assert markdown_table() in DOCS.read_text()


def test_run_takes_defaults_from_the_card(capsys, tiny_ckpt, clip_video, tmp_path):
    from tests.test_cli import _main

    named = tmp_path / "retrieval"
    shutil.copytree(tiny_ckpt, named)
    cfg = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**cfg, "trace_rt_preset": "trace-retrieval"}))
    assert resolve_card(named).name == "trace-retrieval" and resolve_card(tiny_ckpt) is None

    def run(model, *extra):
        code, out, err = _main(capsys, "run", clip_video, "--model", model, "--frames", "5",
                               "--max-new-tokens", "48", *extra)  # fmt: skip
        assert code == 0, err
        return json.loads(out)

    from_card = run(named)
    assert from_card["model_card"] == "trace-retrieval"
    assert from_card["token_ids"] == run(tiny_ckpt, "--timestamps", "frames")["token_ids"]
    # --preset overrides the config's card; an explicit flag overrides the card.
    free = run(tiny_ckpt)
    assert run(named, "--preset", "trace")["token_ids"] == free["token_ids"]
    assert run(named, "--timestamps", "free")["token_ids"] == free["token_ids"]
    assert from_card["token_ids"] != free["token_ids"], "pick a case where the modes differ"
