"""Self-checks of the reference oracle (benchmarks/reference) on a tiny random checkpoint.

The checkpoint writer here is test scaffolding only: it writes the TRACE layout of
trace-model.md with random weights, a ``clip_vision/`` directory and, optionally, shards.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.reference import ReferenceTrace
from benchmarks.reference.oracle import CheckpointError

H, LAYERS, HEADS, KV, INTER, VOCAB = 64, 2, 4, 2, 128, 32000
CLIP_H, CLIP_LAYERS, CLIP_HEADS, CLIP_INTER, IMG, PATCH = 32, 2, 2, 64, 28, 14
SLOTS, TVOCAB = 8, 13
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROMPT = [1, 733, 16289, 28793, -201, 28705, 13, 1824, 349, 28804, 733, 28748, 16289, 28793, 32000]
TIMES = [0.0, 1.5, 12.3]

CONFIG = {
    "model_type": "trace_mistral",
    "architectures": ["TraceMistralForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": H,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "max_position_embeddings": 4096,
    "sliding_window": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "mm_vision_tower": "clip_vision",
    "mm_projector_type": "spatial_slot",
    "mm_hidden_size": CLIP_H,
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "image_aspect_ratio": "pad",
    "num_frames": 3,
    "time_vocab_size": TVOCAB,
    "score_vocab_size": TVOCAB,
}
CLIP_CONFIG = {
    "model_type": "clip_vision_model",
    "architectures": ["CLIPVisionModel"],
    "hidden_size": CLIP_H,
    "intermediate_size": CLIP_INTER,
    "num_hidden_layers": CLIP_LAYERS,
    "num_attention_heads": CLIP_HEADS,
    "image_size": IMG,
    "patch_size": PATCH,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "size": {"shortest_edge": IMG},
    "crop_size": {"height": IMG, "width": IMG},
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
}


def clip_weights(seed: int) -> dict[str, torch.Tensor]:
    """Random CLIPVisionModel weights under plain names (``vision_model.*``)."""
    g = torch.Generator().manual_seed(seed)
    d, i = CLIP_H, CLIP_INTER
    shapes = {
        "embeddings.class_embedding": [d],
        "embeddings.patch_embedding.weight": [d, 3, PATCH, PATCH],
        "embeddings.position_embedding.weight": [(IMG // PATCH) ** 2 + 1, d],
        "pre_layrnorm.weight": [d],
        "pre_layrnorm.bias": [d],
        "post_layernorm.weight": [d],
        "post_layernorm.bias": [d],
    }
    for n in range(CLIP_LAYERS):
        p = f"encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}self_attn.{proj}.weight": [d, d], f"{p}self_attn.{proj}.bias": [d]}
        for ln in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{p}{ln}.weight": [d], f"{p}{ln}.bias": [d]}
        shapes |= {f"{p}mlp.fc1.weight": [i, d], f"{p}mlp.fc1.bias": [i]}
        shapes |= {f"{p}mlp.fc2.weight": [d, i], f"{p}mlp.fc2.bias": [d]}
    return {f"vision_model.{k}": _rand(s, k, g) for k, s in shapes.items()}


def trace_weights(seed: int) -> dict[str, torch.Tensor]:
    """Random TRACE weights (decoder, projector, towers, heads), without the CLIP tower."""
    g = torch.Generator().manual_seed(seed)
    hd = H // HEADS
    shapes = {"model.embed_tokens.weight": [VOCAB, H], "model.norm.weight": [H]}
    shapes |= {"lm_head.weight": [VOCAB, H]}
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        shapes |= {f"{p}self_attn.q_proj.weight": [HEADS * hd, H]}
        shapes |= {f"{p}self_attn.{x}_proj.weight": [KV * hd, H] for x in "kv"}
        shapes |= {f"{p}self_attn.o_proj.weight": [H, HEADS * hd]}
        shapes |= {f"{p}mlp.{x}_proj.weight": [INTER, H] for x in ("gate", "up")}
        shapes |= {f"{p}mlp.down_proj.weight": [H, INTER]}
        shapes |= {f"{p}{x}.weight": [H] for x in ("input_layernorm", "post_attention_layernorm")}
    shapes |= {
        "model.mm_projector.slots": [CLIP_H, SLOTS],
        "model.mm_projector.ln_vision.weight": [CLIP_H],
        "model.mm_projector.ln_vision.bias": [CLIP_H],
        "model.mm_projector.readout.weight": [H, CLIP_H],
        "model.time_tower.embed_tokens.weight": [TVOCAB, H],
        "model.score_tower.embed_tokens.weight": [TVOCAB, H],
        "model.sync_tower.embed_tokens.weight": [1, H],
        "time_head.weight": [TVOCAB, H],
        "score_head.weight": [TVOCAB, H],
        "sync_head.weight": [1, H],
    }
    return {k: _rand(s, k, g) for k, s in shapes.items()}


def _rand(shape: list[int], name: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=g)
    if name.endswith(("norm.weight", "layrnorm.weight", "layer_norm1.weight")) or (
        "layer_norm2.weight" in name or "ln_vision.weight" in name
    ):
        return 1.0 + 0.1 * x
    return x * (1.0 if "slots" in name or "embed" in name else 0.2)


def write_ckpt(
    root: Path,
    *,
    vision_in_ckpt: bool = True,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    drop: str | None = None,
    extra: str | None = None,
) -> dict[str, torch.Tensor]:
    """Write a tiny TRACE checkpoint into *root*; return its weights (checkpoint names)."""
    (root / "clip_vision").mkdir(parents=True)
    (root / "clip_vision" / "config.json").write_text(json.dumps(CLIP_CONFIG))
    (root / "clip_vision" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    save_file(clip_weights(1), root / "clip_vision" / "model.safetensors")
    (root / "config.json").write_text(json.dumps(CONFIG))
    w = trace_weights(0)
    if vision_in_ckpt:  # different values from the CLIP dir's, to tell which one loaded
        w |= {VISION_PREFIX + k[len("vision_model.") :]: v for k, v in clip_weights(2).items()}
    if drop:
        del w[drop]
    if extra:
        w[extra] = torch.zeros(3)
    w = {k: v.to(dtype).contiguous() for k, v in w.items()}
    names = sorted(w)
    if shards == 1:
        save_file(w, root / "model.safetensors")
        return w
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: w[k] for k in names[s::shards]}
        save_file(part, root / fname)
        weight_map |= dict.fromkeys(part, fname)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return w


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("ckpt")
    return root, write_ckpt(root)


@pytest.fixture(scope="module")
def oracle(ckpt) -> ReferenceTrace:
    return ReferenceTrace.from_pretrained(ckpt[0])


def pixels(n: int = len(TIMES)) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


# ---- (a) strict loading ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        ("time_head.weight", None, r"missing 1: time_head\.weight"),
        (VISION_PREFIX + "post_layernorm.bias", None, r"missing 1: .*post_layernorm\.bias"),
        (None, "model.mm_projector.extra.weight", r"unknown 1: model\.mm_projector\.extra"),
    ],
)
def test_load_rejects_missing_or_unknown(tmp_path, drop, extra, message):
    write_ckpt(tmp_path, drop=drop, extra=extra)
    with pytest.raises(CheckpointError, match=message):
        ReferenceTrace.from_pretrained(tmp_path)


def test_loaded_values_match_checkpoint(oracle, ckpt):
    w = ckpt[1]
    torch.testing.assert_close(
        oracle.llm.model.layers[1].mlp.down_proj.weight, w["model.layers.1.mlp.down_proj.weight"]
    )
    torch.testing.assert_close(oracle.sync_embed.weight, w["model.sync_tower.embed_tokens.weight"])
    torch.testing.assert_close(
        oracle.clip.encoder.layers[0].self_attn.q_proj.bias,
        w[VISION_PREFIX + "encoder.layers.0.self_attn.q_proj.bias"],
    )


def test_oracle_imports_nothing_of_trace_rt():
    """The oracle shares no code with what it checks (config parsing included)."""
    code = "import sys, benchmarks.reference; print(sorted(m.split('.')[0] for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'trace_rt'" not in out.stdout and "'torch'" in out.stdout


def test_configs_read_by_transformers(oracle):
    """Every decoder field comes from config.json through MistralConfig, as written."""
    llm = oracle.llm.config
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads) == (H, LAYERS, HEADS)
    assert llm.num_key_value_heads == KV and llm.head_dim == H // HEADS
    theta = getattr(llm, "rope_theta", None) or llm.rope_parameters["rope_theta"]
    assert (theta, llm.rms_norm_eps) == (CONFIG["rope_theta"], CONFIG["rms_norm_eps"])
    assert oracle.text_config.mm_vision_select_layer == -2
    assert oracle.clip.config.num_hidden_layers == CLIP_LAYERS
    assert oracle.processor.crop_size == {"height": IMG, "width": IMG}
    assert (oracle.text_sync, oracle.time_base, oracle.score_base) == (32000, 32001, 32014)
    assert oracle.id_space == 32027


# ---- (b) vision tower from the CLIP directory -------------------------------------------
def test_vision_tower_from_clip_dir_sharded_fp16(tmp_path, oracle):
    from transformers import CLIPVisionModel

    w = write_ckpt(tmp_path, vision_in_ckpt=False, shards=3, dtype=torch.float16)
    ref = ReferenceTrace.from_pretrained(tmp_path)
    torch.testing.assert_close(ref.llm.lm_head.weight, w["lm_head.weight"].float())
    hf = CLIPVisionModel.from_pretrained(tmp_path / "clip_vision", attn_implementation="eager")
    with torch.no_grad():
        want = hf(pixels(), output_hidden_states=True).hidden_states[-2][:, 1:]  # CLS dropped
    got = ref.vision_features(pixels())
    assert got.shape == (len(TIMES), (IMG // PATCH) ** 2, CLIP_H)
    torch.testing.assert_close(got, want)
    # the checkpoint's own tower (seed 2) wins over the CLIP dir's (seed 1) when present
    assert not torch.allclose(oracle.vision_features(pixels()), want)


# ---- (c) video block and projector formula ----------------------------------------------
def projector_by_formula(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """trace-model.md: LN(eps 1e-6) -> rotate-half RoPE (base 1e4) -> softmax_P(x S) -> R."""
    x = x.double()
    p = "model.mm_projector."
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    x = (x - mu) / torch.sqrt(var + 1e-6) * w[p + "ln_vision.weight"].double()
    x = x + w[p + "ln_vision.bias"].double()
    n, d = x.shape[1], x.shape[2]
    y = torch.empty_like(x)
    for pos in range(n):
        for i in range(d // 2):
            a = pos * 10000.0 ** (-2 * i / d)
            c, s = math.cos(a), math.sin(a)
            y[:, pos, i] = x[:, pos, i] * c - x[:, pos, i + d // 2] * s
            y[:, pos, i + d // 2] = x[:, pos, i + d // 2] * c + x[:, pos, i] * s
    logits = torch.einsum("fpd,ds->fps", y, w[p + "slots"].double())
    attn = torch.exp(logits - logits.amax(1, keepdim=True))
    attn = attn / attn.sum(1, keepdim=True)  # over the patches of one frame
    slots = torch.einsum("fps,fpd->fsd", attn, y)
    return torch.einsum("fsd,hd->fsh", slots, w[p + "readout.weight"].double())


def test_encode_video_shape_and_formula(oracle, ckpt):
    w = ckpt[1]
    block = oracle.encode_video(pixels(), TIMES)
    per_frame = SLOTS + 6
    assert block.shape == (len(TIMES) * per_frame, H)
    block = block.view(len(TIMES), per_frame, H)
    want = projector_by_formula(oracle.vision_features(pixels()), w)
    torch.testing.assert_close(block[:, :SLOTS].double(), want, atol=1e-5, rtol=1e-5)
    table = w["model.time_tower.embed_tokens.weight"]
    for f, t in enumerate(TIMES):
        digits = [12 if ch == "." else 2 + int(ch) for ch in format(t, "0>6.1f")]
        torch.testing.assert_close(block[f, SLOTS:], table[digits])


def test_embed_prompt_uses_each_table(oracle, ckpt):
    w = ckpt[1]
    video = oracle.encode_video(pixels(), TIMES)
    e = oracle.embed_prompt([1, -201, 32000, 32005, 32020], video)[0]
    assert e.shape == (1 + len(video) + 3, H)
    n = 1 + len(video)
    torch.testing.assert_close(e[0], w["model.embed_tokens.weight"][1])
    torch.testing.assert_close(e[1:n], video)
    torch.testing.assert_close(e[n], w["model.sync_tower.embed_tokens.weight"][0])
    torch.testing.assert_close(e[n + 1], w["model.time_tower.embed_tokens.weight"][4])
    torch.testing.assert_close(e[n + 2], w["model.score_tower.embed_tokens.weight"][6])
    with pytest.raises(ValueError):
        oracle.embed_prompt([1, 32027])


# ---- (d) task-interleaved greedy decoding -----------------------------------------------
def active_range(head: int) -> tuple[int, int]:
    return [(0, 32001), (32001, 32014), (32014, 32027)][head]


def follow_grammar(ids: list[int]) -> list[int]:
    """The head active before each id (TIME first); asserts each id is in its head."""
    head, heads = 1, []
    for i in ids:
        lo, hi = active_range(head)
        assert lo <= i < hi, f"{i} emitted by head {head} ({ids})"
        heads.append(head)
        head = {32001: 2, 32014: 0, 32000: 1}.get(i, head)
    return heads


def test_generate_switches_heads_and_stops_at_eos(oracle, monkeypatch):
    # wanted id per step; a larger decoy sits in an inactive head each time
    script = [32003, 32013, 32002, 32001, 32020, 32014, 400, 32000, 32005, 32001, 32014, 2, 9]
    decoys = {1: 2, 2: 32000, 0: 32005}  # EOS must not come from the time head, etc.
    heads = follow_grammar(script[:-1])
    steps = iter(zip(script, [*heads, 0], strict=True))

    def fake_step_logits(inputs_embeds, cache):
        want, head = next(steps)
        logits = torch.zeros(32027)
        logits[want], logits[decoys[head]] = 5.0, 10.0
        return logits

    monkeypatch.setattr(oracle, "step_logits", fake_step_logits)
    out = oracle.generate(PROMPT, pixels(), TIMES, max_new_tokens=50)
    assert out == script[:-1]  # ends with EOS (2), included
    steps = iter(zip(script, [*heads, 0], strict=True))
    assert oracle.generate(PROMPT, pixels(), TIMES, max_new_tokens=4) == script[:4]


def test_generate_masks_inactive_heads(oracle):
    norm = oracle.llm.model.norm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.zero_()  # all logits 0: argmax is the first id of the active head
        assert oracle.generate(PROMPT, pixels(), TIMES, max_new_tokens=5) == [
            32001,
            32014,
            0,
            0,
            0,
        ]
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_generate_matches_full_recompute(oracle):
    out = oracle.generate(PROMPT, pixels(), TIMES, max_new_tokens=12)
    assert 1 <= len(out) <= 12 and (len(out) == 12 or out[-1] == 2)
    heads = follow_grammar(out)
    video = oracle.encode_video(pixels(), TIMES)
    logits = oracle.all_logits(oracle.embed_prompt(PROMPT + out[:-1], video))[0]  # [L, V]
    assert logits.shape[-1] == 32027 and logits.dtype == torch.float32
    start = logits.shape[0] - len(out)
    for k, (tok, head) in enumerate(zip(out, heads, strict=True)):
        lo, hi = active_range(head)
        assert lo + int(logits[start + k, lo:hi].argmax()) == tok
