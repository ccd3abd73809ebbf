"""Training past one machine and on one small GPU: FSDP2 over 2 gloo processes equals one
process, sharded checkpoints resume exactly after a kill mid-save and convert to the
release format; LoRA trains only the adapters and merges; global batch and epochs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trace_rt.model import load_model
from training import lora
from training.recipe import TrainConfig
from training.sharded import convert_sharded
from training.synth import SynthConfig, make_synth_data
from training.trainer import STATE_DIR, train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "trainable": ["projector", "towers", "heads", "llm", "embed"],
    "lr": 3.0e-3,
    "warmup_steps": 1,
    "max_steps": 4,
    "batch_size": 1,
    "num_frames": 4,
    "tasks": ["mr"],
    "device": "cpu",
    "log_every": 1,
    "sampling": "rand",
    "save_every": 2,
    "keep_checkpoints": 3,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sdata")
    make_synth_data(root, SynthConfig(videos=4, seed=5, min_duration=4.0, max_duration=5.0,
                                      min_window=1.5, max_window=2.5, max_shapes=1,
                                      tasks=("mr",)))  # fmt: skip
    return root


def _torchrun(cfg: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", "-m", "training", "train", "--config", str(cfg), "--data",
         str(data), "--out", str(out), "--no-progress", *extra],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (fsdp) on cpu" in proc.stderr
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    cfg = tmp / "r.yaml"
    cfg.write_text(yaml.safe_dump({**RECIPE, "parallel": "fsdp"}))
    out = tmp / "out"
    return cfg, out, _torchrun(cfg, data, out, "--preset", "tiny")


def test_fsdp_two_processes_equal_one_process(data, fsdp_run, tmp_path):
    _, out, log2 = fsdp_run
    one = train(TrainConfig.from_dict({**RECIPE, "batch_size": 2, "save_every": 0}), data,
                tmp_path / "one", preset="tiny", progress=False)  # fmt: skip
    two = [r["loss"] for r in log2]
    assert len(two) == 4 and two[-1] < two[0]
    assert two == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
    a, b = load_model(out), load_model(tmp_path / "one")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst < 1e-4
    # The run wrote sharded step checkpoints (one file per process), not full copies.
    step = out / STATE_DIR / "step-0000004"
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_sharded_checkpoint_converts_to_the_release_format(fsdp_run, tmp_path):
    _, out, _ = fsdp_run
    conv = convert_sharded(out / STATE_DIR / "step-0000004", tmp_path / "rel")
    a, b = load_model(conv), load_model(out)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert (conv / "tokenizer.model").is_file() and (conv / "clip_vision").is_dir()
    with pytest.raises(ValueError, match="not a sharded"):
        convert_sharded(conv, tmp_path / "x")
    from training.cli import main as training_main

    step = out / STATE_DIR / "step-0000002"
    assert training_main(["convert-checkpoint", str(step), str(tmp_path / "cli")]) == 0
    assert load_model(tmp_path / "cli").config.num_frames == 4
    assert training_main(["convert-checkpoint", str(tmp_path / "nope"), str(tmp_path / "y")]) == 2


def test_fsdp_resume_after_a_kill_mid_save_is_exact(data, fsdp_run, tmp_path):
    """What a kill while step 4 was being saved leaves: step 2 complete and named by
    ``latest``, a half-written temporary directory. --resume replays steps 3-4 exactly."""
    cfg, out, log = fsdp_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    state = run / STATE_DIR
    shutil.rmtree(state / "step-0000004")
    (state / ".tmp-step-0000004").mkdir()
    (state / ".tmp-step-0000004" / "__0_0.distcp").write_bytes(b"\0" * 100)
    (state / "latest").write_text("step-0000002\n")
    (run / "model.safetensors").unlink()
    again = _torchrun(cfg, data, run, "--resume")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    a, b = load_model(run), load_model(out)
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
    assert not (state / ".tmp-step-0000004").exists()


def test_lora_trains_only_the_adapters_and_merges(data, tmp_path):
    rc = TrainConfig.from_dict({**RECIPE, "trainable": ["heads"], "lora": {"r": 4, "alpha": 8,
                                "dropout": 0.0, "merge": False}, "save_every": 0})  # fmt: skip
    out = tmp_path / "lora"
    init = tmp_path / "init"
    from training.make_checkpoint import make_checkpoint

    make_checkpoint(init, "tiny", seed=0)
    train(rc, data, out, init=init, progress=False)
    base, after = load_model(init).state_dict(), load_model(out).state_dict()
    from safetensors.torch import load_file

    ad = load_file(str(out / lora.ADAPTER_FILE))
    assert ad and all(".lora_A" in k or ".lora_B" in k for k in ad)
    assert any(float(v.abs().max()) > 0 for k, v in ad.items() if ".lora_B" in k)  # learned
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    # Only the recipe's group learned; the LLM's weights stayed frozen (adapters apart).
    assert changed and changed <= {"time_head.weight", "score_head.weight", "sync_head.weight"}

    # Merging folds the adapters in: the merged model computes what base + adapters do.
    model = load_model(out, dtype=torch.float32)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0))
    lora.load_adapters(model, ad)
    x = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)
    with torch.no_grad():
        want = model.forward_embeds(x, pos)
        lora.merge(model)
        got = model.forward_embeds(x, pos)
    assert not any(isinstance(m, lora.LoraLinear) for m in model.modules())
    assert torch.allclose(want, got, atol=1e-5)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight,
                              load_model(out).model.layers[0].self_attn.q_proj.weight)  # fmt: skip


def test_global_batch_and_epochs_resolve():
    rc = TrainConfig.load("stage2")
    assert rc.template == "mistral_instruct" and rc.sampling == "rand"
    assert rc.weight_decay == 0 and rc.warmup_ratio == 0.03 and rc.dtype == "bf16"
    assert rc.gradient_checkpointing and "vision" not in rc.trainable
    r16 = rc.resolved(samples=10_000, processes=16)
    assert r16.batch_size * r16.grad_accum * 16 == 128 and r16.grad_accum == 2
    assert r16.max_steps == 157  # ceil(2 epochs * 10000 / 128)
    assert rc.resolved(10_000, 1).grad_accum == 32
    with pytest.raises(ValueError, match="not a multiple"):
        rc.resolved(10_000, 3)
    s1 = TrainConfig.load("stage1")
    assert s1.sampling == "uniform" and set(s1.trainable) == {"projector", "towers", "heads"}
    assert s1.resolved(1280, 8).max_steps == 10
    with pytest.raises(ValueError, match="lora"):
        TrainConfig.from_dict({"lora": {"rank": 3}})


def _training_args(command: str) -> list[str]:
    """The arguments after ``-m training`` in a launch command (shell words)."""
    import shlex

    words = shlex.split(command.replace("\\\n", " "))
    return words[words.index("training", words.index("-m")) + 1 :]


def test_multi_node_launchers_parse_and_shard():
    """The Slurm script and the PyTorchJob manifest run torchrun with arguments our CLI
    accepts, a shipped recipe that shards (FSDP), and the same command on every pod."""
    from training.cli import _parser

    job = yaml.safe_load((ROOT / "deploy/training/pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    pods = [specs[r]["template"]["spec"]["containers"][0] for r in ("Master", "Worker")]
    assert pods[0] == pods[1] and pods[0]["name"] == "pytorch"
    gpus = int(pods[0]["resources"]["limits"]["nvidia.com/gpu"])
    assert int(job["spec"]["nprocPerNode"]) == gpus
    cmd = pods[0]["args"][0]
    assert cmd.startswith("torchrun") and "$PET_NNODES" in cmd and "$PET_NODE_RANK" in cmd
    slurm = (ROOT / "deploy/training/slurm.sbatch").read_text()
    assert "srun torchrun" in slurm and "--rdzv_backend=c10d" in slurm
    for command, nodes in ((cmd, 1 + specs["Worker"]["replicas"]),
                           (slurm[slurm.index("srun torchrun") :], 4)):  # fmt: skip
        args = _parser().parse_args(_training_args(command))
        assert args.command == "train" and args.resume
        rc = TrainConfig.load(args.config)
        assert rc.parallel == "fsdp"
        assert rc.resolved(100_000, nodes * gpus).grad_accum >= 1  # global batch 128 fits


def test_lora_resume_is_exact(data, tmp_path):
    """Adapters, optimiser state and the dropout RNG come back from a step checkpoint."""
    from training.make_checkpoint import make_checkpoint

    make_checkpoint(tmp_path / "init", "tiny", seed=0)
    rc = TrainConfig.from_dict({**RECIPE, "trainable": ["heads"], "keep_checkpoints": 2,
                                "lora": {"r": 4, "alpha": 8, "dropout": 0.1}})  # fmt: skip
    full = train(rc, data, tmp_path / "a", init=tmp_path / "init", progress=False)["losses"]
    out = tmp_path / "b"
    shutil.copytree(tmp_path / "a", out)
    shutil.rmtree(out / STATE_DIR / "step-0000004")
    (out / STATE_DIR / "latest").write_text("step-0000002\n")
    assert (out / STATE_DIR / "step-0000002" / lora.ADAPTER_FILE).is_file()
    again = train(rc, data, out, resume=True, progress=False)["losses"]
    assert again == pytest.approx(full[2:], rel=1e-6)
    a, b = load_model(out), load_model(tmp_path / "a")  # merged into OUT both times
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
