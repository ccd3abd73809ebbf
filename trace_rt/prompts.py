"""Prompt data (system text, task questions) and the release's chunk-wise tokenisation.

A checkpoint answers well only to the wording it was trained on, so the strings live in
``trace_rt/data/trace-prompts.json`` (verbatim from the released code) and a user may
point :meth:`PromptSet.load` at their own file with the same layout. A model trained with
other strings carries them beside its weights (``prompts.json``, written by the trainer
and copied by the exporter); :meth:`PromptSet.for_model` reads them from there.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from trace_rt.config import IdSpace
from trace_rt.errors import InputError
from trace_rt.tokenizer import TextTokenizer
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID

DEFAULT_PROMPTS_FILE = Path(__file__).parent / "data" / "trace-prompts.json"
# A model's own prompt strings, beside its config.json (checkpoint or artifact directory).
MODEL_PROMPTS_FILE = "prompts.json"
TASKS = ("dvc", "mr", "vhd")
QUERY_TASKS = ("mr", "vhd")
CUSTOM_TASK = "custom"
DEFAULT_TEMPLATE = "llama_2"
# Positions of a typical prompt besides its video block: the dvc prompt in the default
# template, the release's system prompt included, with the Mistral tokenizer (BOS and the
# closing <sync> counted; mr/vhd add their query). For estimates made before a request
# exists (trace-rt plan, TensorRT's opt prefill length); tests/test_prompts.py keeps it true.
PROMPT_TEXT_TOKENS = 161
VIDEO_TOKEN = "<video>"
SYNC_TOKEN = "<sync>"
_PLACEHOLDER_RE = re.compile(f"({re.escape(VIDEO_TOKEN)}|{re.escape(SYNC_TOKEN)})")


@dataclass(frozen=True)
class Template:
    """A chat template: ``format`` has ``{system}`` and ``{user}`` fields."""

    format: str
    system: str

    def render(self, user: str) -> str:
        return self.format.format(system=self.system, user=user)


@dataclass(frozen=True)
class PromptSet:
    """The prompt strings of one prompts file.

    Attributes:
        templates: Chat templates by name (``llama_2``, ``mistral_instruct``).
        user_message: The user turn, with ``<video>`` and a ``{question}`` field.
        after_prompt: Appended after the template (``<sync>``: generation starts in the
            time head).
        tasks: Question per task; tasks taking a query have one ``{}`` field.
        source: The file the strings came from.
    """

    templates: Mapping[str, Template]
    user_message: str
    after_prompt: str
    tasks: Mapping[str, str]
    source: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None) -> PromptSet:
        """Read a prompts file (default: the release's strings shipped with trace-rt)."""
        path = Path(path) if path is not None else DEFAULT_PROMPTS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise InputError(f"prompts file {path} does not exist") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"prompts file {path} is not readable JSON ({e})") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def for_model(cls, model_dir: str | Path, path: str | Path | None = None) -> PromptSet:
        """The prompts a model answers to: *path* when given, else the ``prompts.json`` it
        was trained with (:func:`model_prompts_file`), else the release's strings."""
        return cls.load(path if path is not None else model_prompts_file(model_dir))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> PromptSet:
        """Build and validate a prompt set from the JSON layout of ``trace-prompts.json``."""
        where = f"prompts file {source}"
        if not isinstance(raw, dict):
            raise InputError(f"{where}: top level must be a JSON object")
        templates_raw = raw.get("templates")
        if not isinstance(templates_raw, dict) or not templates_raw:
            raise InputError(f"{where}: 'templates' must be a non-empty object")
        templates = {}
        for name, t in templates_raw.items():
            if not isinstance(t, dict) or not all(
                isinstance(t.get(k), str) for k in ("format", "system")
            ):
                raise InputError(f"{where}: template {name!r} needs string 'format' and 'system'")
            templates[name] = Template(t["format"], t["system"])
        fields = {k: raw.get(k) for k in ("user_message", "after_prompt")}
        tasks = raw.get("tasks")
        if not all(isinstance(v, str) for v in fields.values()):
            raise InputError(f"{where}: 'user_message' and 'after_prompt' must be strings")
        if not isinstance(tasks, dict) or not all(isinstance(v, str) for v in tasks.values()):
            raise InputError(f"{where}: 'tasks' must map task names to strings")
        ps = cls(
            MappingProxyType(templates),
            fields["user_message"],
            fields["after_prompt"],
            MappingProxyType(dict(tasks)),
            source,
        )
        ps._validate(where)
        return ps

    def _validate(self, where: str) -> None:
        missing = [t for t in TASKS if t not in self.tasks]
        if missing:
            raise InputError(f"{where}: tasks {missing} are missing")
        for task, text in self.tasks.items():
            fields = text.count("{}")
            need = (1,) if task in QUERY_TASKS else (0,) if task in TASKS else (0, 1)
            if fields not in need:
                raise InputError(
                    f"{where}: task {task!r} must contain {' or '.join(map(str, need))} "
                    "'{}' query field(s), found " + str(fields)
                )
            if fields:
                _try_format(where, f"task {task!r}", text, "q")
        if self.user_message.count(VIDEO_TOKEN) != 1 or "{question}" not in self.user_message:
            raise InputError(f"{where}: user_message needs one {VIDEO_TOKEN} and a {{question}}")
        user = _try_format(where, "user_message", self.user_message, question="q")
        if not self.after_prompt.endswith(SYNC_TOKEN) or VIDEO_TOKEN in self.after_prompt:
            raise InputError(
                f"{where}: after_prompt must end with {SYNC_TOKEN}, without {VIDEO_TOKEN}"
            )
        for name, t in self.templates.items():
            text = _try_format(where, f"template {name!r}", t.format, system=t.system, user=user)
            if text.count(VIDEO_TOKEN) != 1 or SYNC_TOKEN in text:
                raise InputError(
                    f"{where}: template {name!r} must hold the user's {VIDEO_TOKEN} only once "
                    f"and no {SYNC_TOKEN}"
                )

    def question(
        self, task: str | None, query: str | None = None, question: str | None = None
    ) -> str:
        """The question text of *task* (``None``/``"custom"`` takes *question* verbatim)."""
        if task is None or task == CUSTOM_TASK:
            if query is not None:
                raise InputError(
                    "a query is only for the tasks 'mr' and 'vhd'; "
                    "a custom question carries its own wording"
                )
            return _check_text(question, "question")
        if not isinstance(task, str) or task not in self.tasks:
            known = ", ".join([*self.tasks, CUSTOM_TASK])
            raise InputError(f"unknown task {task!r}; known tasks: {known}")
        if question is not None:
            raise InputError(
                f"task {task!r} has a fixed question; pass question= only with task={CUSTOM_TASK!r}"
            )
        text = self.tasks[task]
        if "{}" not in text:
            if query is not None:
                raise InputError(f"task {task!r} takes no query (got {query!r})")
            return text
        return text.format(_check_text(query, f"query (task {task!r} needs one)"))

    def render(self, question: str, template: str = DEFAULT_TEMPLATE) -> str:
        """The full prompt string for *question*, ending with ``after_prompt``."""
        if template not in self.templates:
            raise InputError(f"unknown template {template!r}; known: {', '.join(self.templates)}")
        user = self.user_message.format(question=question)
        return self.templates[template].render(user) + self.after_prompt


def _try_format(where: str, what: str, text: str, *args: str, **kwargs: str) -> str:
    try:
        return text.format(*args, **kwargs)
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(
            f"{where}: {what} does not format ({e!r}); write braces as {{{{ }}}}"
        ) from e


def _check_text(value: Any, what: str) -> str:
    if value is None:
        raise InputError(f"missing {what}")
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{what} is empty")
    for token in (VIDEO_TOKEN, SYNC_TOKEN):
        if token in value:
            raise InputError(f"{what} must not contain the placeholder {token}")
    return value


def model_prompts_file(model_dir: str | Path) -> Path | None:
    """The ``prompts.json`` beside a model's ``config.json``, where it has one."""
    path = Path(model_dir) / MODEL_PROMPTS_FILE
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def default_prompts() -> PromptSet:
    """The release's prompt strings shipped with trace-rt (loaded once)."""
    return PromptSet.load()


def build_prompt(
    task: str | None,
    *,
    query: str | None = None,
    question: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    prompts: PromptSet | None = None,
) -> str:
    """The full prompt string: template(system, ``<video>\\n{question}``) + ``<sync>``.

    Args:
        task: ``"dvc"``, ``"mr"``, ``"vhd"`` (or another task of *prompts*), or
            ``None``/``"custom"`` for a free *question*.
        query: The text query of ``mr``/``vhd``, inserted verbatim.
        question: The free question of a custom task.
        template: ``"llama_2"`` (the release's evaluation) or ``"mistral_instruct"``.
        prompts: Prompt strings; default: :func:`default_prompts`.

    Raises:
        InputError: Unknown task/template, missing or unexpected query, empty text, or
            text containing a placeholder.
    """
    prompts = prompts if prompts is not None else default_prompts()
    return prompts.render(prompts.question(task, query, question), template)


def tokenize_prompt(prompt: str, tok: TextTokenizer, ids: IdSpace) -> list[int]:
    """Prompt ids the way the release made them (trace-model.md, "The input sequence").

    The prompt is split at ``<video>`` and ``<sync>``; each text chunk is encoded on its
    own (sentencepiece dummy prefix included), BOS starts the sequence, ``<video>``
    becomes :data:`~trace_rt.tokens.VIDEO_PLACEHOLDER_ID` and ``<sync>`` the text sync id.
    Empty chunks add nothing.
    """
    out = [tok.bos_id]
    for i, part in enumerate(_PLACEHOLDER_RE.split(prompt)):
        if i % 2:
            out.append(VIDEO_PLACEHOLDER_ID if part == VIDEO_TOKEN else ids.text_sync)
        elif part:
            out.extend(tok.encode(part))
    return out


def prompt_ids(
    task: str | None,
    *,
    tok: TextTokenizer,
    ids: IdSpace,
    query: str | None = None,
    question: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    prompts: PromptSet | None = None,
) -> list[int]:
    """:func:`build_prompt` then :func:`tokenize_prompt`."""
    prompt = build_prompt(task, query=query, question=question, template=template, prompts=prompts)
    return tokenize_prompt(prompt, tok, ids)
