"""Run by tests/test_distributed.py under torchrun: the test_train model and data, trained with
FSDP2 + expert parallelism on every rank, sharded checkpoints. Usage:
    torchrun --nproc_per_node=2 tests/distributed_worker.py RUN_DIR STEPS KILL_AT [distill]
`distill`: the student learns from a frozen teacher, parallelised like the model; `bf16`: bf16
parameters in compute, fp32 reductions; `2d`: a ("dp", "ep") mesh with expert-parallel groups of 2.
    torchrun --nproc_per_node=2 tests/distributed_worker.py RUN_DIR STEPS -1 rl CHECKPOINT
`evaluated`: a forward without backward (an evaluation) before training.
`rl`: `herd train`'s online RL stage on CHECKPOINT, its answers scored by a checker whose verdicts
vary (`lucky_rl`), 2 prompts per rank."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herd.distributed import init_distributed, parallelize  # noqa: E402
from herd.distributed.checkpoint import ShardedCheckpointer, export_hf  # noqa: E402
from herd.train.loop import train  # noqa: E402
from herd.train.distill import DistillationLoss  # noqa: E402
from tests.test_train import KillAt, Killed, cfg, labelled_loss, small_model, token_data  # noqa: E402

BATCH = 2  # per rank


def distill_teacher():
    return small_model(seed=1, hidden_size=48)


def evaluation_forward(model):
    model.eval()
    with torch.no_grad():
        model(torch.arange(3, 15)[None])
    model.train()


def lucky_rl(run):
    """herd's RL recipe with every answer scored by `Lucky` (right iff its length is even): a random
    model never answers a task right, and all-equal groups would leave RL nothing to train on."""
    from herd.train.recipes import rl
    from tests.test_post_losses import Lucky

    stage = rl(run)
    stage.data.tasks = {task.name: Lucky() for task in run.post_tasks}
    return stage


def rl_config(run_dir: Path, init: str, steps: int, prompts: int):
    from herd.train.config import apply_overrides, smoke

    return apply_overrides(smoke(), {"out": str(run_dir), "init": init, "code_bytes": "100000", "answer_tokens": "8",
                                     "post_eval_problems": "2", "rl_steps": str(steps), "rl_prompts": str(prompts),
                                     "rl_max_attempts": "1", "rl_kl_beta": "0.1", "ckpt_every": "1"})


def main():
    run_dir, steps, kill_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if sys.argv[4:5] == ["rl"]:
        from herd.pipeline import run

        run(rl_config(run_dir, sys.argv[5], steps, prompts=2), stages=[lucky_rl])
        return
    ctx = init_distributed(expert_parallel=2 if sys.argv[4:] == ["2d"] else 0)
    model = parallelize(small_model(), ctx.mesh, param_dtype=torch.bfloat16 if sys.argv[4:] == ["bf16"] else None)
    loss = labelled_loss
    if sys.argv[4:] == ["distill"]:
        loss = DistillationLoss(parallelize(distill_teacher(), ctx.mesh), weighting="dynamic", alpha=0.9,
                                alpha_end=0.1)
    if sys.argv[4:] == ["evaluated"]:  # a stage before this one ended with an evaluation
        evaluation_forward(model)
    data = token_data(batch=BATCH)
    data.rank, data.world_size = ctx.rank, ctx.world_size
    source = KillAt(data, kill_at) if kill_at >= 0 else data
    c = cfg(steps=steps, bias_rate=0.05)
    try:
        train(model, c, source, loss, run_dir, checkpointer=ShardedCheckpointer(run_dir / "ckpt"))
        export_hf(model, run_dir / "hf")
    except Killed:
        pass
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
