"""The text tokenizer: the checkpoint's sentencepiece model, used directly.

The release tokenised with transformers' *slow* ``LlamaTokenizer`` (``use_fast=False``),
which for plain text is exactly ``SentencePieceProcessor.encode`` with the model's dummy
prefix. Using sentencepiece directly keeps serving images free of transformers and
avoids the fast (``tokenizers``) Llama tokenizer, which splits runs of spaces
differently (see ``tests/test_tokenizer.py``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from trace_rt.errors import CheckpointError, InputError

TOKENIZER_FILE = "tokenizer.model"
_MISTRAL_COMMON_MODEL = ("data", "tokenizer.model.v1")


class TextTokenizer:
    """A sentencepiece model for the text part of the id space (ids ``0..vocab_size-1``).

    Args:
        processor: A loaded ``SentencePieceProcessor``.
        path: The file it was loaded from, if any (for messages).
    """

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None):
        self._sp = processor
        self.path = path
        self._vocab_size = int(processor.get_piece_size())
        # Ids that decode() drops, as HF's skip_special_tokens does: BOS, EOS, UNK, PAD.
        specials = (processor.bos_id(), processor.eos_id(), processor.unk_id(), processor.pad_id())
        self._skip = frozenset(i for i in specials if i >= 0)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load a sentencepiece ``.model`` file."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer model {path} does not exist")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a sentencepiece model ({e})") from e
        return cls(sp, path)

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> TextTokenizer:
        """Load ``tokenizer.model`` of a checkpoint or artifact directory."""
        path = Path(checkpoint_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{checkpoint_dir}: no {TOKENIZER_FILE}; a TRACE checkpoint carries the "
                "Mistral sentencepiece model under that name"
            )
        return cls.from_file(path)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def encode(self, text: str) -> list[int]:
        """Text ids of *text*, with the model's dummy prefix and no BOS/EOS.

        Special-token spellings such as ``"</s>"`` inside *text* stay literal text (HF's
        tokenizers would turn them into control ids).
        """
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a str, not {type(text).__name__}")
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of *ids*, skipping ids outside the text vocabulary and BOS/EOS/UNK/PAD."""
        n, skip = self._vocab_size, self._skip
        keep = [int(i) for i in ids if 0 <= i < n and i not in skip]
        return self._sp.decode(keep)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self._vocab_size}, path={str(self.path)!r})"


def default_tokenizer_model() -> Path:
    """Path of the 32000-token Mistral sentencepiece model shipped by ``mistral-common``.

    The package is located, not imported. Used to put a real tokenizer into checkpoints
    made for tests and demos.
    """
    spec = importlib.util.find_spec("mistral_common")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root).joinpath(*_MISTRAL_COMMON_MODEL)
        if path.is_file():
            return path
    if not roots:
        raise CheckpointError(
            "the mistral-common package is not installed; it ships the Mistral tokenizer "
            "(pip install mistral-common)"
        )
    raise CheckpointError(f"mistral-common at {roots[0]} has no {'/'.join(_MISTRAL_COMMON_MODEL)}")
