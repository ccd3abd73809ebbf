"""Model cards: what each released TRACE checkpoint expects at inference.

The release family (https://github.com/gyxxyg/TRACE, "Model Zoo") shares one architecture
and one tokenisation; its checkpoints differ in what they were trained to do and how the
authors evaluate them. A card records those facts so that ``trace-rt run`` starts from
them instead of from the generic defaults:

* ``template``: the chat template of the original's evaluation scripts (``llama_2``);
* ``frames``: frames sampled per video in its evaluation (128; the checkpoint's
  ``num_frames`` is the same number for the release);
* ``temperature``: 0, greedy, everywhere in the original's evaluation;
* ``timestamps``: ``frames`` for ``trace-retrieval`` (trained so that every timestamp
  is one of the input frames' times), ``free`` otherwise;
* ``tasks``: what the checkpoint was trained for (``qa``: multiple-choice video QA).

Which card applies is read, never guessed from a directory or file name: the
checkpoint's ``config.json`` field ``trace_rt_preset`` (write it when you download a
release), else its ``_name_or_path`` when that is exactly a release's Hugging Face id
(``Yongxin-Guo/trace-uni``), else ``--preset NAME`` on the command line (which also
overrides the others). Without any of them no card applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trace_rt.errors import InputError

HF_ORG = "Yongxin-Guo"
CARD_FIELD = "trace_rt_preset"


@dataclass(frozen=True)
class ModelCard:
    name: str
    description: str
    tasks: tuple[str, ...]
    template: str = "llama_2"
    frames: int = 128
    temperature: float = 0.0
    timestamps: str = "free"

    @property
    def hf_id(self) -> str:
        return f"{HF_ORG}/{self.name}"


_GROUNDING = ("dvc", "mr", "vhd")
MODEL_CARDS: dict[str, ModelCard] = {
    c.name: c
    for c in (
        ModelCard("trace", "stage-2 model: the paper's zero-shot results", _GROUNDING),
        ModelCard(
            "trace-uni",
            "trace plus general video-QA data (LLaVA-Video-178K subset); MVBench 53.8, "
            "Video-MME 49.6",
            (*_GROUNDING, "qa"),
        ),
        ModelCard(
            "trace-retrieval",
            "timestamps aligned to the input frames' times (better dense captioning)",
            _GROUNDING,
            timestamps="frames",
        ),
        ModelCard("trace-ft-charades", "trace fine-tuned on Charades-STA", ("mr",)),
        ModelCard("trace-ft-youcook2", "trace fine-tuned on YouCook2", ("dvc",)),
        ModelCard("trace-ft-qvhighlights", "trace fine-tuned on QVHighlights", ("vhd",)),
    )
}


def get_card(name: str) -> ModelCard:
    try:
        return MODEL_CARDS[name]
    except KeyError:
        raise InputError(
            f"unknown model card {name!r}; choose one of {', '.join(MODEL_CARDS)}"
        ) from None


def card_from_config(raw: dict) -> ModelCard | None:
    """The card a checkpoint's ``config.json`` names (see the module docstring)."""
    named = raw.get(CARD_FIELD)
    if named is not None:
        if not isinstance(named, str):
            raise InputError(f"config.json: {CARD_FIELD} must be a string, got {named!r}")
        return get_card(named)
    path = raw.get("_name_or_path")
    for card in MODEL_CARDS.values():
        if path in (card.hf_id, card.name):
            return card
    return None


def resolve_card(model_dir: str | Path, preset: str | None = None) -> ModelCard | None:
    """``--preset`` if given, else the card *model_dir*'s ``config.json`` names."""
    if preset is not None:
        return get_card(preset)
    cfg = Path(model_dir) / "config.json"
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None  # the model loader reports a missing or broken config itself
    return card_from_config(raw) if isinstance(raw, dict) else None


def markdown_table() -> str:
    """The cards as the Markdown table of docs/model-cards.md."""
    rows = [
        "| card | Hugging Face | tasks | template | frames | decoding | timestamps | what |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in MODEL_CARDS.values():
        decoding = "greedy" if c.temperature == 0 else f"T={c.temperature}"
        rows.append(
            f"| `{c.name}` | `{c.hf_id}` | {', '.join(c.tasks)} | {c.template} | {c.frames} "
            f"| {decoding} | {c.timestamps} | {c.description} |"
        )
    return "\n".join(rows) + "\n"
