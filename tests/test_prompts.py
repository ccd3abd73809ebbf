"""Prompt strings and the release's chunk-wise tokenisation."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trace_rt.config import IdSpace
from trace_rt.errors import InputError
from trace_rt.prompts import (
    DEFAULT_PROMPTS_FILE,
    PROMPT_TEXT_TOKENS,
    TASKS,
    PromptSet,
    build_prompt,
    default_prompts,
    prompt_ids,
    tokenize_prompt,
)
from trace_rt.tokenizer import TextTokenizer, default_tokenizer_model
from trace_rt.tokens import VIDEO_PLACEHOLDER_ID

IDS = IdSpace(32000, 13, 13)
SHARED = Path("/work/shared/data/trace-prompts.json")
RAW = json.loads(DEFAULT_PROMPTS_FILE.read_text())
SYSTEM = RAW["templates"]["llama_2"]["system"]


# ---- prompt data -----------------------------------------------------------------------
@pytest.mark.skipif(not SHARED.is_file(), reason="no shared copy of the prompts file")
def test_packaged_file_is_verbatim_copy() -> None:
    assert DEFAULT_PROMPTS_FILE.read_bytes() == SHARED.read_bytes()


def test_default_prompt_set() -> None:
    ps = default_prompts()
    assert TASKS == ("dvc", "mr", "vhd")
    assert set(ps.templates) == {"llama_2", "mistral_instruct"}
    assert "while being safe.  Your answers" in ps.templates["llama_2"].system
    assert ps.user_message == "<video>\n{question}" and ps.after_prompt == "<sync>"
    assert PromptSet.load() == ps


@pytest.mark.parametrize("template", ["llama_2", "mistral_instruct"])
def test_build_prompt_exact(template: str) -> None:
    t = RAW["templates"][template]
    head = f"[INST] <<SYS>>\n{t['system']}\n<</SYS>>\n\n<video>\n"
    assert build_prompt("dvc", template=template) == head + RAW["tasks"]["dvc"] + " [/INST]<sync>"
    mr = build_prompt("mr", query="a dog {runs}", template=template)
    assert mr == head + RAW["tasks"]["mr"].replace("{}", "a dog {runs}") + " [/INST]<sync>"
    vhd = build_prompt("vhd", query="cooking", template=template)
    assert "sentence query: 'cooking'. Please return" in vhd
    free = build_prompt(None, question="What happens?", template=template)
    assert free == head + "What happens? [/INST]<sync>"
    assert build_prompt("custom", question="What happens?", template=template) == free


def test_default_template_is_llama_2() -> None:
    assert SYSTEM in build_prompt("dvc")


def test_extra_task_of_the_file() -> None:
    assert RAW["tasks"]["dvc_activitynet"] in build_prompt("dvc_activitynet")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "caption"}, "unknown task 'caption'"),
        ({"task": "mr"}, "missing query"),
        ({"task": "vhd"}, "missing query"),
        ({"task": "dvc", "query": "x"}, "takes no query"),
        ({"task": "mr", "query": ""}, "query .* is empty"),
        ({"task": "mr", "query": "  \n"}, "query .* is empty"),
        ({"task": "vhd", "query": 3}, "must be a string"),
        ({"task": "mr", "query": "a <video> b"}, "placeholder <video>"),
        ({"task": "mr", "query": "a <sync>"}, "placeholder <sync>"),
        ({"task": None}, "missing question"),
        ({"task": "custom", "question": ""}, "question is empty"),
        ({"task": None, "question": "q", "query": "x"}, "query is only for"),
        ({"task": "dvc", "question": "q"}, "fixed question"),
        ({"task": "dvc", "template": "vicuna"}, "unknown template 'vicuna'"),
    ],
)
def test_build_prompt_errors(kwargs: dict, match: str) -> None:
    task = kwargs.pop("task")
    with pytest.raises(InputError, match=match):
        build_prompt(task, **kwargs)


def test_user_override_file(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(RAW))
    raw["templates"]["llama_2"]["system"] = "Be brief."
    raw["tasks"]["mr"] = "Find '{}'."
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    ps = PromptSet.load(path)
    got = build_prompt("mr", query="q", prompts=ps)
    assert got == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<video>\nFind 'q'. [/INST]<sync>"
    assert ps.source == str(path)


def test_a_models_own_prompts(tmp_path: Path) -> None:
    # Explicit file > the model's prompts.json (written by training) > the release's.
    from trace_rt.prompts import MODEL_PROMPTS_FILE

    model, other = tmp_path / "model", tmp_path / "other.json"
    model.mkdir()
    assert PromptSet.for_model(model).source == str(DEFAULT_PROMPTS_FILE)
    raw = json.loads(json.dumps(RAW))
    raw["templates"]["llama_2"]["system"] = ""
    (model / MODEL_PROMPTS_FILE).write_text(json.dumps(raw))
    ps = PromptSet.for_model(model)
    assert ps.source == str(model / MODEL_PROMPTS_FILE)
    assert build_prompt("dvc", prompts=ps).startswith("[INST] <<SYS>>\n\n<</SYS>>\n\n<video>")
    shutil.copyfile(DEFAULT_PROMPTS_FILE, other)
    assert PromptSet.for_model(model, other).source == str(other)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r["tasks"].__setitem__("mr", "no field"), "task 'mr' must contain 1"),
        (lambda r: r["tasks"].__setitem__("dvc", "q '{}'"), "task 'dvc' must contain 0"),
        (lambda r: r["tasks"].pop("vhd"), "missing"),
        (lambda r: r.__setitem__("after_prompt", ""), "after_prompt must end with <sync>"),
        (lambda r: r.__setitem__("user_message", "{question}"), "user_message needs"),
        (
            lambda r: r["templates"]["llama_2"].__setitem__("format", "{user} {oops}"),
            "'llama_2' does not format",
        ),
        (lambda r: r["tasks"].__setitem__("mr", "{} {x}"), "task 'mr' does not format"),
        (lambda r: r.__setitem__("user_message", "<video>{question}{"), "user_message does not"),
        (lambda r: r["templates"]["llama_2"].__setitem__("system", "<video>"), "only once"),
        (lambda r: r.__setitem__("templates", {}), "templates"),
        (lambda r: r.__setitem__("tasks", ["dvc"]), "tasks"),
    ],
)
def test_invalid_override_files(tmp_path: Path, edit, match: str) -> None:
    raw = json.loads(json.dumps(RAW))
    edit(raw)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=match):
        PromptSet.load(path)


def test_unreadable_override_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        PromptSet.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        PromptSet.load(tmp_path / "bad.json")


# ---- tokenisation ------------------------------------------------------------------------
def test_prompt_ids_facts(tok: TextTokenizer) -> None:
    for task, query in (("dvc", None), ("mr", "a man cuts onions"), ("vhd", "a dog")):
        ids = prompt_ids(task, query=query, tok=tok, ids=IDS)
        assert ids[:4] == [1, 733, 16289, 28793]
        assert ids.count(VIDEO_PLACEHOLDER_ID) == 1 and ids.count(1) == 1
        v = ids.index(VIDEO_PLACEHOLDER_ID)
        assert ids[v + 1 : v + 3] == [28705, 13]
        assert ids[-1] == IDS.text_sync == 32000 and ids.count(32000) == 1
        assert ids[-5:-1] == [733, 28748, 16289, 28793]  # " [/INST]" before <sync>


def test_typical_prompt_length(tok: TextTokenizer) -> None:
    # What the plan and TensorRT's opt prefill length assume beside the video block: the
    # dvc prompt in the default template, exactly; a query adds its own tokens.
    text = len(prompt_ids("dvc", tok=tok, ids=IDS)) - 1  # less the video placeholder
    assert text == PROMPT_TEXT_TOKENS
    mr = len(prompt_ids("mr", query="a man cuts onions", tok=tok, ids=IDS)) - 1
    assert PROMPT_TEXT_TOKENS < mr < PROMPT_TEXT_TOKENS + 30


def test_whole_string_encoding_differs(tok: TextTokenizer) -> None:
    prompt = build_prompt("mr", query="a man cuts onions")
    ours = tokenize_prompt(prompt, tok, IDS)
    whole = [tok.bos_id, *tok.encode(prompt)]
    assert whole != ours
    # Even with the placeholders mapped afterwards, the chunk edges differ: one-string
    # encoding has no dummy '▁' before the newline after <video>.
    text_only = [tok.bos_id, *tok.encode(prompt.replace("<video>", "").replace("<sync>", ""))]
    assert [i for i in ours if 0 <= i < 32000] != text_only


def test_tokenize_prompt_edges(tok: TextTokenizer) -> None:
    assert tokenize_prompt("<video><sync>", tok, IDS) == [1, VIDEO_PLACEHOLDER_ID, 32000]
    assert tokenize_prompt("", tok, IDS) == [1]
    tail = tok.encode("\nx")
    assert tail[:2] == [28705, 13]
    assert tokenize_prompt("[INST]<sync>\nx", tok, IDS) == [1, 733, 16289, 28793, 32000, *tail]


# ---- parity with transformers ---------------------------------------------------------------
# The release ran transformers 4.40 with AutoTokenizer(use_fast=False): the slow,
# sentencepiece LlamaTokenizer (Mistral's tokenizer_config says legacy=true). For text
# chunks that spell no special token, both of its modes equal SentencePieceProcessor.encode
# with the dummy prefix: legacy=True calls it directly; legacy=False prepends '▁' itself to
# a model loaded without the dummy prefix. transformers 5 no longer has that class:
# LlamaTokenizer, LlamaTokenizerFast (an alias) and AutoTokenizer(use_fast=False) all give
# the `tokenizers` BPE conversion, which differs on runs of spaces (the system text's
# "safe.  Your"). Its SentencePieceBackend still runs the slow code path, so the parity
# tests use it (adding BOS, which that base class does not, and, for legacy=False, the
# '▁' that 4.40's LlamaTokenizer.tokenize added).
def _release_ids(prompt: str, encode_chunk) -> list[int]:
    """The release's tokenizer_MMODAL_token_all over a per-chunk encoder that adds BOS."""
    chunks = re.split("<video>|<sync>", prompt)
    marks = re.findall("<video>|<sync>", prompt)
    out = list(encode_chunk(chunks[0]))
    for mark, chunk in zip(marks, chunks[1:], strict=True):
        out.append(VIDEO_PLACEHOLDER_ID if mark == "<video>" else 32000)
        out.extend(encode_chunk(chunk)[1:])
    return out


@pytest.fixture(scope="module")
def hf_slow():
    """transformers' sentencepiece backend: the code path of the release's slow tokenizer."""
    spb = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    path = str(default_tokenizer_model())
    kw = {"vocab_file": path, "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    legacy = spb.SentencePieceBackend(legacy=True, **kw)
    non_legacy = spb.SentencePieceBackend(legacy=False, **kw)

    def enc_legacy(text: str) -> list[int]:  # transformers 4.40 LlamaTokenizer, legacy=True
        return [1, *legacy.convert_tokens_to_ids(legacy.tokenize(text))]

    def enc_non_legacy(text: str) -> list[int]:  # 4.40 LlamaTokenizer.tokenize, legacy=False
        if not text:
            return [1]
        toks = non_legacy.tokenize("▁" + text.replace("▁", " "))
        return [1, *non_legacy.convert_tokens_to_ids(toks)]

    return {"legacy": enc_legacy, "non_legacy": enc_non_legacy}


@pytest.fixture(scope="module")
def hf_fast(tmp_path_factory):
    tr = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf_tok")
    shutil.copy(default_tokenizer_model(), d / "tokenizer.model")
    # The fields of Mistral-7B-Instruct-v0.2's tokenizer_config.json that matter here.
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tr.LlamaTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("variant", ["legacy", "non_legacy"])
@pytest.mark.parametrize("template", ["llama_2", "mistral_instruct"])
@pytest.mark.parametrize(
    ("task", "query"), [("dvc", None), ("mr", "a man  cuts onions"), ("vhd", 'it\'s "great"\tnow')]
)
def test_matches_hf_slow_tokenizer(tok, hf_slow, variant, template, task, query) -> None:
    prompt = build_prompt(task, query=query, template=template)
    assert tokenize_prompt(prompt, tok, IDS) == _release_ids(prompt, hf_slow[variant])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(min_size=1, max_size=40).filter(
        lambda s: (
            s.strip() and not any(t in s for t in ("<video>", "<sync>", "<s>", "</s>", "<unk>"))
        )
    )
)
def test_random_questions_match_hf_slow(tok, hf_slow, question: str) -> None:
    prompt = build_prompt(None, question=question)
    assert tokenize_prompt(prompt, tok, IDS) == _release_ids(prompt, hf_slow["legacy"])


def test_hf_fast_tokenizer_differs_at_double_space(tok, hf_fast) -> None:
    """transformers 5's LlamaTokenizer (= LlamaTokenizerFast, a ``tokenizers`` BPE) merges
    the two spaces after "safe." into '▁▁'; sentencepiece (and the release's slow
    tokenizer) gives '▁' + '▁Your'. Without the double space the two agree."""

    def fast(text: str) -> list[int]:
        return hf_fast(text).input_ids

    prompt = build_prompt("mr", query="a man cuts onions")
    ours, theirs = tokenize_prompt(prompt, tok, IDS), _release_ids(prompt, fast)
    assert ours != theirs
    assert [28705, 3604] in [ours[i : i + 2] for i in range(len(ours))]
    assert [259, 11159] in [theirs[i : i + 2] for i in range(len(theirs))]
    single = prompt.replace("safe.  Your", "safe. Your")
    assert tokenize_prompt(single, tok, IDS) == _release_ids(single, fast)


def test_special_token_spellings_in_queries(tok, hf_slow) -> None:
    """A query spelling "</s>" stays text here; HF's tokenizers turn it into EOS (2)."""
    prompt = build_prompt("mr", query="the end </s>")
    ours = tokenize_prompt(prompt, tok, IDS)
    assert 2 not in ours and 2 in _release_ids(prompt, hf_slow["legacy"])
