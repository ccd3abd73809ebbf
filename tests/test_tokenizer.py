"""TextTokenizer on the real Mistral sentencepiece model, and import hygiene."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trace_rt.errors import CheckpointError, InputError
from trace_rt.tokenizer import TextTokenizer, default_tokenizer_model


def test_default_model_is_mistral(tok: TextTokenizer) -> None:
    assert default_tokenizer_model().name == "tokenizer.model.v1"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)


def test_encode_known_ids(tok: TextTokenizer) -> None:
    assert tok.encode("[INST]") == [733, 16289, 28793]
    assert tok.encode("\nfoo") == [28705, 13, 8014]  # dummy prefix '▁', then newline
    assert tok.encode("") == []


def test_encode_keeps_special_spellings_literal(tok: TextTokenizer) -> None:
    assert 2 not in tok.encode("a </s> b") and 1 not in tok.encode("<s>")


def test_encode_rejects_non_str(tok: TextTokenizer) -> None:
    with pytest.raises(InputError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_decode_round_trip_and_skips(tok: TextTokenizer) -> None:
    text = "A man slices onions.\nThen he fries them."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    noisy = [1, *ids[:3], 2, 32000, 32005, -201, 0, *ids[3:], 32020]
    assert tok.decode(noisy) == text


def test_from_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tokenizer\.model"):
        TextTokenizer.from_dir(tmp_path)
    shutil.copy(default_tokenizer_model(), tmp_path / "tokenizer.model")
    assert TextTokenizer.from_dir(tmp_path).encode("[INST]") == [733, 16289, 28793]


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        TextTokenizer.from_file(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a sentencepiece model"):
        TextTokenizer.from_file(bad)


def test_runtime_modules_import_no_heavy_packages() -> None:
    code = (
        "import sys\n"
        "import trace_rt.tokenizer, trace_rt.prompts, trace_rt.events, trace_rt.constrained\n"
        "trace_rt.tokenizer.default_tokenizer_model()\n"
        "bad = [m for m in ('torch', 'transformers', 'mistral_common') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
