"""FSDP2 + expert parallelism on 2 CPU processes (gloo) match one process on the same global
batch, and a sharded checkpoint resumes exactly."""

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import herd
from herd.train.loop import train
from herd.train.losses import causal_lm_loss
from tests.test_train import cfg, small_model, token_data, train_losses

WORKER = Path(__file__).with_name("distributed_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run_dir: Path, steps: int, kill_at: int = -1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(WORKER), str(run_dir), str(steps), str(kill_at)]
    # its own session, so that a hang is cleaned up whole (torchrun's workers included)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]


def test_two_processes_match_one_and_resume_from_a_sharded_checkpoint(tmp_path):
    steps = 6
    reference = small_model()
    train(reference, cfg(steps=steps, bias_rate=0.05), token_data(batch=4), causal_lm_loss, tmp_path / "single")
    single = train_losses(tmp_path / "single")

    torchrun(tmp_path / "dist", steps)
    two = train_losses(tmp_path / "dist")
    for step in range(1, steps + 1):
        assert two[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step

    # As if killed after step 3's checkpoint: drop the final one, run again, compare steps 4-6.
    ckpts = tmp_path / "dist" / "ckpt"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000003", "step_000006"]
    shutil.rmtree(ckpts / "step_000006")
    (tmp_path / "dist" / "metrics.jsonl").rename(tmp_path / "first_metrics.jsonl")
    torchrun(tmp_path / "dist", steps)
    resumed = train_losses(tmp_path / "dist")
    assert min(resumed) == 4  # it really resumed
    for step in range(4, steps + 1):
        assert resumed[step] == pytest.approx(two[step], rel=1e-6, abs=1e-7), step

    # the gathered export is a normal Hugging Face checkpoint with the single run's weights
    exported = herd.from_pretrained(tmp_path / "dist" / "hf")
    ids = torch.randint(3, 60, (1, 12))
    for m in reference.modules():
        if hasattr(m, "selection_bias"):
            m.selection_bias = None
    torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
