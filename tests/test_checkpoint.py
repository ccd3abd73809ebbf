"""Checkpoint format: release weight names, round trips, dtypes, a separate CLIP dir."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from trace_rt.config import TraceConfig
from trace_rt.errors import CheckpointError
from trace_rt.model import load_model, save_model
from trace_rt.model.checkpoint import weight_files
from training.make_checkpoint import make_checkpoint
from training.presets import load_preset

RELEASE_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.bias",
    "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
    "model.mm_projector.slots",
    "model.mm_projector.ln_vision.weight",
    "model.mm_projector.ln_vision.bias",
    "model.mm_projector.readout.weight",
    "model.time_tower.embed_tokens.weight",
    "model.score_tower.embed_tokens.weight",
    "model.sync_tower.embed_tokens.weight",
    "time_head.weight",
    "score_head.weight",
    "sync_head.weight",
]


def _tensors(path):
    out = {}
    for f in weight_files(path):
        out.update(load_file(f))
    return out


def test_release_names_and_layout(tiny_ckpt):
    names = set(_tensors(tiny_ckpt))
    assert set(RELEASE_NAMES) <= names
    assert not any("kv_cache" in n or "rotary" in n for n in names)
    assert (tiny_ckpt / "tokenizer.model").is_file()
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "trace_mistral"
    assert cfg["mm_projector_type"] == "spatial_slot"
    # The release's loader only accepts CLIP tower names containing "clip".
    assert "clip" in cfg["mm_vision_tower"]
    assert (tiny_ckpt / cfg["mm_vision_tower"] / "preprocessor_config.json").is_file()


def test_round_trip_identical(tiny_ckpt, tmp_path):
    m1 = load_model(tiny_ckpt)
    save_model(m1, tmp_path / "a", tokenizer_model=tiny_ckpt / "tokenizer.model")
    m2 = load_model(tmp_path / "a")
    a, b, raw = m1.state_dict(), m2.state_dict(), _tensors(tiny_ckpt)
    assert list(a) == list(b) and set(a) == set(raw)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], raw[k]), k
    assert _tensors(tmp_path / "a").keys() == raw.keys()


def test_sharded_round_trip(tiny_ckpt, tmp_path):
    m1 = load_model(tiny_ckpt)
    save_model(m1, tmp_path / "s", max_shard_bytes=1_500_000)
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    assert len(weight_files(tmp_path / "s")) > 1
    m2 = load_model(tmp_path / "s")
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_dtypes(tmp_path, dtype):
    path = make_checkpoint(tmp_path / dtype, "tiny", seed=0, dtype=dtype, progress=False)
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert all(t.dtype == want for t in _tensors(path).values())
    assert TraceConfig.from_dir(path).torch_dtype == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    m = load_model(path)
    assert m.lm_head.weight.dtype == want
    ref = load_model(make_checkpoint(tmp_path / "f32", "tiny", seed=0, progress=False))
    # Same seed: the half checkpoint is the fp32 one rounded.
    torch.testing.assert_close(m.lm_head.weight.float(), ref.lm_head.weight, rtol=1e-2, atol=1e-3)
    m32 = load_model(path, dtype="fp32")
    assert m32.lm_head.weight.dtype == torch.float32


def test_separate_vision_tower(tiny_ckpt, tmp_path):
    path = make_checkpoint(
        tmp_path / "sep", "tiny", seed=0, separate_vision_tower=True, progress=False
    )
    assert not any(n.startswith("model.vision_tower") for n in _tensors(path))
    clip = load_file(path / "clip_vision" / "model.safetensors")
    assert "vision_model.embeddings.class_embedding" in clip
    a, b = load_model(tiny_ckpt).state_dict(), load_model(path).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_absolute_clip_dir(tiny_ckpt, tmp_path):
    ck = tmp_path / "abs"
    shutil.copytree(tiny_ckpt, ck)
    clip = shutil.move(ck / "clip_vision", tmp_path / "my_clip_vision")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["mm_vision_tower"] = str(clip)
    (ck / "config.json").write_text(json.dumps(cfg))
    assert load_model(ck).config.vision == load_model(tiny_ckpt).config.vision


def test_missing_and_unknown_weights_are_errors(tiny_ckpt, tmp_path):
    sd = _tensors(tiny_ckpt)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    dropped = dict(sd)
    del dropped["model.mm_projector.slots"]
    save_file(dropped, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing weights: model\.mm_projector\.slots"):
        load_model(bad)
    extra = dict(sd, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)})
    save_file(extra, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unknown weights: model\.layers\.9"):
        load_model(bad)
    wrong = dict(sd, **{"time_head.weight": torch.zeros(12, 64)})
    save_file(wrong, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"wrong shape.*time_head\.weight"):
        load_model(bad)
    no_vision = {k: v for k, v in sd.items() if not k.startswith("model.vision_tower")}
    save_file(no_vision, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="vision tower weights"):
        load_model(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(bad)


def test_bad_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        TraceConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "trace_mistral"}))
    with pytest.raises(CheckpointError, match="mm_vision_tower"):
        TraceConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "trace_mistral", "mm_vision_tower": "nowhere_clip"})
    )
    with pytest.raises(CheckpointError, match="nowhere_clip"):
        TraceConfig.from_dir(tmp_path)


def test_release_hub_tower_needs_no_download():
    cfg = load_preset("trace-7b")
    raw = cfg.to_dict() | {"mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    rel = TraceConfig.from_dict(raw)
    assert rel.vision.num_patches == 576 and rel.vision.hidden_size == 1024
    assert rel.tokens_per_frame == 14 and rel.num_frames * rel.tokens_per_frame == 1792
    assert rel.vision_layers_used == 23


def test_trace_7b_preset_dimensions():
    cfg = load_preset("trace-7b")
    from trace_rt.model.checkpoint import expected_shapes

    shapes = expected_shapes(cfg)
    n = sum(s.numel() for s in shapes.values())
    assert 7.5e9 < n < 7.7e9  # Mistral-7B (7.24B) + CLIP-L (0.30B) + projector/towers
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.mm_projector.readout.weight"] == (4096, 1024)
    assert shapes["sync_head.weight"] == (1, 4096)


def test_weights_get_the_same_mode_as_every_other_file(tmp_path):
    import os
    import stat

    path = make_checkpoint(
        tmp_path / "c", "tiny", separate_vision_tower=True, max_shard_gb=0.005, progress=False
    )
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len([p for p in files if p.suffix == ".safetensors"]) >= 3  # shards + clip weights
    modes = {p.relative_to(path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {want}, modes


def test_make_checkpoint_refuses_to_overwrite(tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "c"
    assert main(["make-checkpoint", str(out), "--seed", "1"]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main(["make-checkpoint", str(out), "--seed", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a checkpoint" in err and "--force" in err and len(err.splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["make-checkpoint", str(out), "--seed", "2", "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != before
