"""Training: the loss goes down, resume is exact, torchrun writes one checkpoint, and a
trained checkpoint serves through ``trace-rt run`` (torch and exported onnxruntime)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.cli import main as training_main
from training.recipe import TrainConfig
from training.synth import SynthConfig, make_synth_data
from training.trainer import STATE_DIR, train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "trainable": ["vision", "projector", "towers", "heads", "llm", "embed"],
    "lr": 3.0e-3,
    "warmup_steps": 1,
    "max_steps": 8,
    "batch_size": 2,
    "num_frames": 4,
    "tasks": ["mr"],
    "device": "cpu",
    "log_every": 1,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tdata")
    make_synth_data(root, SynthConfig(videos=3, seed=5, min_duration=4.0, max_duration=5.0,
                                      min_window=1.5, max_window=2.5, max_shapes=1,
                                      tasks=("mr",)))  # fmt: skip
    # Two samples and batch 2: every step sees the same batch, so the loss must fall.
    doc = json.loads((root / "train.json").read_text())
    doc["samples"] = doc["samples"][:2]
    (root / "train.json").write_text(json.dumps(doc))
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpt"
    summary = train(TrainConfig.from_dict(RECIPE), data, out, preset="tiny", progress=False)
    return out, summary


def test_loss_goes_down(trained):
    out, summary = trained
    losses = summary["losses"]
    assert len(losses) == RECIPE["max_steps"]
    assert losses[-1] < 0.75 * losses[0], losses
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert {"loss_text", "loss_time", "loss_score", "samples_per_s"} <= set(log[0])
    # Every head learns (the text head starts near ln 32001 on the release's four text
    # labels per answer: the space, <sync>, the space before </s>, EOS).
    for head in ("text", "time", "score"):
        assert log[-1][f"loss_{head}"] < 0.85 * log[0][f"loss_{head}"], head
    # The release-format checkpoint in OUT, and one resumable checkpoint under .train.
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["num_frames"] == 4
    assert (out / STATE_DIR / "latest").read_text().strip() == "step-0000008"


def test_resume_gives_the_same_next_step_loss(data, tmp_path):
    rc = TrainConfig.from_dict({**RECIPE, "max_steps": 4, "save_every": 2, "sampling": "jitter"})
    full = train(rc, data, tmp_path / "a", preset="tiny", progress=False)["losses"]
    # Roll the run back to its step-2 checkpoint and continue.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / STATE_DIR / "latest").write_text("step-0000002\n")
    resumed = train(rc, data, tmp_path / "b", resume=True, progress=False)
    assert resumed["start_step"] == 2
    assert resumed["losses"] == pytest.approx(full[2:], rel=1e-6, abs=1e-6)
    # The log has each step once: steps 3 and 4 of the rolled-back run are replaced.
    log = [json.loads(ln) for ln in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["loss"] for r in log[2:]] == pytest.approx(resumed["losses"], rel=1e-9)
    with pytest.raises(FileExistsError, match="--resume"):  # a fresh run would mix the two
        train(rc, data, tmp_path / "a", preset="tiny", progress=False)


def test_a_run_paused_with_until_resumes_into_the_same_run(data, tmp_path):
    # Several starts can be compared at a step and the best one continued: pausing keeps
    # the schedule of max_steps, so the continued run is the uninterrupted one.
    rc = TrainConfig.from_dict({**RECIPE, "max_steps": 4, "sampling": "jitter"})
    full = train(rc, data, tmp_path / "a", preset="tiny", progress=False)
    paused = train(rc, data, tmp_path / "b", preset="tiny", progress=False, until=2)
    assert paused["paused"] and paused["steps"] == 2
    assert not (tmp_path / "b" / "config.json").exists()  # no final model yet
    assert (tmp_path / "b" / STATE_DIR / "latest").read_text().strip() == "step-0000002"
    rest = train(rc, data, tmp_path / "b", resume=True, progress=False)
    assert paused["losses"] + rest["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=1e-6)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    with pytest.raises(ValueError, match="until must lie after the start step 0 and before"):
        train(rc, data, tmp_path / "c", preset="tiny", progress=False, until=4)


def _weights(ckpt: Path) -> dict:
    from trace_rt.model import load_model

    return load_model(ckpt).state_dict()


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_past_a_rotated_checkpoint(data, tmp_path):
    # keep_checkpoints 1 (the shipped tiny recipe's): the step resumed from is deleted by
    # the next save, and with it the tokenizer the run used to copy from.
    rc = {**RECIPE, "save_every": 1, "keep_checkpoints": 1}
    out = tmp_path / "o"
    train(TrainConfig.from_dict({**rc, "max_steps": 2}), data, out, preset="tiny", progress=False)
    summary = train(TrainConfig.from_dict({**rc, "max_steps": 4}), data, out, resume=True,
                    progress=False)  # fmt: skip
    assert summary["start_step"] == 2
    assert sorted(p.name for p in (out / STATE_DIR).glob("step-*")) == ["step-0000004"]
    assert _same(_weights(out), _weights(out / STATE_DIR / "step-0000004"))
    assert (out / "tokenizer.model").read_bytes() == (out / STATE_DIR / "step-0000004" /
                                                      "tokenizer.model").read_bytes()  # fmt: skip


def test_the_prompts_a_model_was_trained_with_travel_with_it(data, tmp_path):
    # A recipe's prompts_file (read beside the recipe) is saved as OUT/prompts.json; a run
    # --init from that model keeps it (also when resumed), the runtime and the exporter
    # read it from there.
    from export.onnx_export import _write_support_files
    from trace_rt.model import load_model
    from trace_rt.pipeline import Pipeline
    from trace_rt.prompts import DEFAULT_PROMPTS_FILE, MODEL_PROMPTS_FILE

    raw = json.loads(DEFAULT_PROMPTS_FILE.read_text())
    raw["templates"]["llama_2"]["system"] = ""
    raw["tasks"]["mr"] = "Find '{}'."
    (tmp_path / "recipes").mkdir()
    mine = tmp_path / "recipes" / "mine.json"
    mine.write_text(json.dumps(raw))
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "max_steps": 2, "prompts_file": "mine.json"}))
    rc = TrainConfig.load(recipe)
    assert rc.prompts_file == str(mine.resolve())
    a, b = tmp_path / "a", tmp_path / "b"
    train(rc, data, a, preset="tiny", progress=False)
    assert (a / MODEL_PROMPTS_FILE).read_bytes() == mine.read_bytes()
    mine.unlink()  # the run keeps its own copy, and resumes with it
    assert train(rc, data, a, resume=True, progress=False)["start_step"] == 2
    assert (a / MODEL_PROMPTS_FILE).read_text() == json.dumps(raw)
    plain = TrainConfig.from_dict({**RECIPE, "max_steps": 2, "save_every": 1})
    train(plain, data, b, init=a, progress=False)
    (b / STATE_DIR / "latest").write_text("step-0000001\n")
    (b / MODEL_PROMPTS_FILE).unlink()
    assert train(plain, data, b, resume=True, progress=False)["start_step"] == 1
    for d in (b, b / STATE_DIR / "step-0000002"):
        assert json.loads((d / MODEL_PROMPTS_FILE).read_text()) == raw
    pipe = Pipeline.from_dir(b, "torch")
    assert pipe.prompts.source == str(b / MODEL_PROMPTS_FILE)
    assert pipe.prompts.render(pipe.prompts.question("mr", query="q")) == (
        "[INST] <<SYS>>\n\n<</SYS>>\n\n<video>\nFind 'q'. [/INST]<sync>"
    )
    _write_support_files(load_model(b), b, tmp_path / "art", "fp32")
    assert json.loads((tmp_path / "art" / MODEL_PROMPTS_FILE).read_text()) == raw
    # A model trained on the release's strings carries none: OUT drops an earlier copy.
    shutil.rmtree(a / STATE_DIR)
    train(TrainConfig.from_dict({**RECIPE, "max_steps": 1}), data, a, preset="tiny",
          progress=False)  # fmt: skip
    assert not (a / MODEL_PROMPTS_FILE).exists()
    assert Pipeline.from_dir(a, "torch").prompts.source == str(DEFAULT_PROMPTS_FILE)


KILL_IN_FINAL_SAVE = """
import os, sys
from pathlib import Path
from training.recipe import TrainConfig
from training.trainer import train

real = os.replace
def replace(src, dst):  # die like a killed process while OUT's files are renamed in
    if Path(dst).name == "model.safetensors" and ".final-tmp" in str(src):
        os._exit(3)
    return real(src, dst)
os.replace = replace
rc, data, out = TrainConfig.from_dict(eval(sys.argv[1])), sys.argv[2], sys.argv[3]
train(rc, data, out, resume=True, progress=False)
"""


def test_kill_inside_the_final_save(data, tmp_path):
    from trace_rt.errors import CheckpointError

    out = tmp_path / "o"
    train(TrainConfig.from_dict({**RECIPE, "max_steps": 2}), data, out, preset="tiny",
          progress=False)  # fmt: skip
    rc4 = {**RECIPE, "max_steps": 4}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_FINAL_SAVE, repr(rc4), str(data), str(out)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert (out / STATE_DIR / "latest").read_text().strip() == "step-0000004"
    step4 = _weights(out / STATE_DIR / "step-0000004")
    # OUT must not pass for a model it is not: either it does not load, or it is step 4's.
    try:
        stale = not _same(_weights(out), step4)
    except CheckpointError:
        stale = False
    assert not stale, "OUT still loads the step-2 model while latest names step 4"
    # --resume finishes the job: nothing to train, OUT rewritten from step 4.
    summary = train(TrainConfig.from_dict(rc4), data, out, resume=True, progress=False)
    assert summary["start_step"] == 4 and summary["losses"] == []
    assert _same(_weights(out), step4)
    assert (out / STATE_DIR / "final").read_text().strip() == "step-0000004"
    log = [json.loads(ln)["step"] for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_train_cli_errors_are_one_line(data, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "max_steps": 1}))
    base = ["train", "--out", str(tmp_path / "o"), "--preset", "tiny", "--no-progress"]
    cases = [
        (["--config", "nope.yaml", "--data", str(data)], "no recipe file nope.yaml"),
        (["--config", str(recipe), "--data", str(tmp_path / "nope")], "no training split file"),
        (["--config", str(recipe), "--data", str(data), "--device", "cuda"], "cuda"),
    ]
    import torch

    for extra, message in cases:
        if "cuda" in extra and torch.cuda.is_available():
            continue
        assert training_main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and message in err.splitlines()[-1], err
        assert not (tmp_path / "o" / "model.safetensors").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    assert training_main([*base, "--config", str(bad), "--data", str(data)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_readme_training_commands_from_another_cwd(tmp_path):
    # The README's commands, relative paths and all, run from a directory that is not the
    # repository (the recipe by its repo path and by its name).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "training", *args], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    run("synth-data", "data/synth", "--videos", "2", "--seed", "0", "--max-shapes", "1",
        "--tasks", "mr", "--min-duration", "3", "--max-duration", "4")  # fmt: skip
    doc = json.loads((tmp_path / "data/synth/train.json").read_text())
    assert doc["samples"][0]["video"].startswith("videos/")
    for config in ("training/recipes/tiny-synthetic.yaml", "tiny-synthetic"):
        out = f"checkpoints/{config.replace('/', '_')}"
        run("train", "--config", config, "--data", "data/synth", "--out", out, "--preset", "tiny",
            "--max-steps", "1", "--no-progress")  # fmt: skip
        assert (tmp_path / out / "model.safetensors").is_file()


def test_trained_checkpoint_runs_through_trace_rt(trained, data, tmp_path):
    from export import export_onnx

    out, _ = trained
    art = export_onnx(out, tmp_path / "art", progress=False)
    sample = json.loads((data / "val.json").read_text())["samples"][0]
    video = str(data / sample["video"])
    results = []
    for model, backend in ((out, "torch"), (art, "onnxruntime")):
        proc = subprocess.run(
            [sys.executable, "-m", "trace_rt", "run", video, "--model", str(model), "--backend",
             backend, "--task", "mr", "--query", sample["query"], "--max-new-tokens", "24"],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        assert res["frames"] == 4 and res["token_ids"]
        results.append(res["token_ids"])
    assert results[0] == results[1]


def test_bad_data_stops_training_with_the_sample_id(data, tmp_path, capsys):
    doc = json.loads((data / "train.json").read_text())
    bad = {**doc["samples"][0], "id": "broken-one", "video": str(tmp_path / "missing.mp4")}
    doc["samples"] = [doc["samples"][0], bad]
    split = tmp_path / "train.json"
    split.write_text(json.dumps(doc).replace('"videos/', f'"{data}/videos/'))
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({**RECIPE, "max_steps": 1}))
    args = ["train", "--config", str(cfg), "--data", str(split), "--preset", "tiny",
            "--no-progress"]  # fmt: skip
    assert training_main([*args, "--out", str(tmp_path / "o1")]) == 2
    assert "broken-one" in capsys.readouterr().err
    assert training_main([*args, "--out", str(tmp_path / "o2"), "--on-bad-sample", "skip"]) == 0
    assert (tmp_path / "o2" / "model.safetensors").is_file()


def test_torchrun_two_processes_write_one_checkpoint(data, tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({**RECIPE, "max_steps": 2, "batch_size": 1}))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", "-m", "training", "train", "--config", str(cfg), "--data",
         str(data), "--out", str(out), "--preset", "tiny", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (ddp) on cpu" in proc.stderr
    steps = sorted(p.name for p in (out / STATE_DIR).iterdir() if p.name.startswith("step-"))
    assert steps == ["step-0000002"]
    assert not list(out.glob(".final-tmp*")) and (out / "model.safetensors").is_file()
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2  # written by rank 0 only


def test_gradient_checkpointing_and_bf16(data):
    import torch

    from trace_rt.tokenizer import TextTokenizer
    from training.data import load_split
    from training.dataset import GroundingDataset, collate
    from training.loss import TraceLoss
    from training.trainer import build_model

    model, tok_file = build_model(None, "tiny", 4, seed=0)
    ds = GroundingDataset(load_split(data), model.config, TextTokenizer.from_file(tok_file))
    batch = collate([ds.get(0), ds.get(1)])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        loss, _ = TraceLoss(model, grad_checkpoint=ckpt)(batch)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    # Recomputing layers in the backward pass changes memory, not gradients.
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = TraceLoss(model, grad_checkpoint=True)(batch)[0].detach()
    loss = float(loss.detach())
    assert torch.isfinite(loss16) and abs(float(loss16) - loss) < 0.1 * loss


def test_processes_share_each_global_batch():
    from training.trainer import Dist, micro_batches

    rc = TrainConfig.from_dict({**RECIPE, "batch_size": 2, "grad_accum": 2})
    seen = []
    for step in range(3):  # 3 steps x 2 micro-batches x 2 ranks x 2 = 24 = two epochs of 12
        for rank in (0, 1):
            for mb in micro_batches(12, rc, Dist(rank, 2), step):
                seen.extend(mb)
    by_epoch = {e: sorted(i for i, ep in seen if ep == e) for e in (0, 1)}
    assert by_epoch == {0: list(range(12)), 1: list(range(12))}


def test_group_by_video_keeps_a_clip_together():
    """Groups are permuted whole: each epoch still covers every sample once, and a
    group's samples are consecutive in the stream (so they share a batch unless one
    straddles a batch's end)."""
    from training.trainer import Dist, micro_batches

    groups = [[0, 1], [2], [3, 4, 5], [6, 7], [8], [9, 10, 11]]
    rc = TrainConfig.from_dict({**RECIPE, "batch_size": 3, "group_by_video": True})
    stream = [x for step in range(8) for mb in micro_batches(12, rc, Dist(), step, groups)
              for x in mb]  # fmt: skip
    for e in (0, 1):
        order = [i for i, ep in stream if ep == e]
        assert sorted(order) == list(range(12))
        for g in groups:
            at = order.index(g[0])
            assert order[at : at + len(g)] == g
    plain = [x for mb in micro_batches(12, rc, Dist(), 0) for x in mb]
    assert plain != stream[:3]  # the same seed, another order: the grouping is used


def test_trim_log_drops_later_steps_and_a_cut_line(tmp_path):
    from training.trainer import trim_log

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4))
                   + '{"step": 5, "lo')  # fmt: skip
    trim_log(log, 2)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_cpu_step_does_not_fault_its_gradients_in_again():
    # Each step frees the [vocab, hidden] gradients and allocates them anew; by default
    # glibc hands those pages back to the OS, so every step faults them in again.
    code = """
import resource, torch
from training.trainer import keep_freed_memory
torch.manual_seed(0)
torch.set_num_threads(1)
emb, head = torch.nn.Embedding(32000, 64), torch.nn.Linear(64, 32000, bias=False)
opt = torch.optim.AdamW([*emb.parameters(), *head.parameters()])
ids = torch.randint(0, 32000, (8, 64))
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        head(emb(ids)[:, :4]).logsumexp(-1).mean().backward()
        opt.step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
faults()
before = max(faults() for _ in range(3))
assert keep_freed_memory()
faults()  # the heap grows to its new size once
print(before, sorted(faults() for _ in range(3))[1])
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    before, after = map(float, out.stdout.split())
    assert before > 1000  # 8 MB gradients: 2048 pages each
    assert after < before / 10  # the median step: 0-0.1 faults here
