"""FSDP2 + expert parallelism on 2 CPU processes (gloo) match one process on the same global
batch (losses and the loss's metrics, with or without a frozen teacher sharded like the model), and
a sharded checkpoint resumes exactly; `herd train` under torchrun trains the joint stage (images per
rank) as one process does and distils from a sharded teacher in bf16; post-training on a
checkpoint (SFT and DPO equal to one process, online RL with rollouts per rank, resumed); a 2-D
mesh (4 processes, slow) matches one process too."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import herd
from herd.train.distill import DistillationLoss
from herd.train.loop import train
from tests.distributed_worker import distill_teacher
from tests.test_train import cfg, labelled_loss, small_model, token_data, train_losses

WORKER = Path(__file__).with_name("distributed_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def torchrun(run_dir: Path, steps: int, kill_at: int = -1, *mode: str):
    run_processes(str(WORKER), str(run_dir), str(steps), str(kill_at), *mode)


def run_processes(*args: str, processes: int = 2):
    """`torchrun --nproc_per_node=PROCESSES ARGS` on CPU (gloo), one thread per process."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    # --standalone: torchrun finds a free port itself (a port chosen here could be taken before it binds)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    # its own session, so that a hang is cleaned up whole (torchrun's workers included)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)  # generous: a loaded machine is slow, not wrong
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 900 s; its output:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]


def test_two_processes_match_one_and_resume_from_a_sharded_checkpoint(tmp_path):
    steps = 6
    reference = small_model()
    train(reference, cfg(steps=steps, bias_rate=0.05), token_data(batch=4), labelled_loss, tmp_path / "single")
    single = train_losses(tmp_path / "single")

    torchrun(tmp_path / "dist", steps)
    two = train_losses(tmp_path / "dist")
    for step in range(1, steps + 1):
        assert two[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step
    assert_same_metrics(tmp_path / "single", tmp_path / "dist", ["mean_target"])

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


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def assert_same_metrics(single_dir: Path, dist_dir: Path, names: list[str]):
    single, two = train_records(single_dir), train_records(dist_dir)
    assert single.keys() == two.keys()
    for step in single:
        for name in names:
            assert two[step][name] == pytest.approx(single[step][name], rel=1e-5, abs=1e-6), (step, name)


def test_two_processes_distil_from_a_sharded_frozen_teacher_as_one_does(tmp_path):
    steps = 4
    loss = DistillationLoss(distill_teacher(), weighting="dynamic", alpha=0.9, alpha_end=0.1)
    train(small_model(), cfg(steps=steps, bias_rate=0.05), token_data(batch=4), loss, tmp_path / "single")
    torchrun(tmp_path / "dist", steps, -1, "distill")
    assert_same_metrics(tmp_path / "single", tmp_path / "dist",
                        ["loss", "hard_loss", "soft_loss", "soft_weight", "teacher_loss", "teacher_confidence"])


def test_an_evaluation_before_training_leaves_every_weight_trained(tmp_path):
    """A forward without backward (the evaluation that ends a stage) leaves FSDP2's root unit (the
    embeddings, final norm and lm_head) gathered; the next stage's optimiser must still hold, and
    train, their shards: the losses equal one process's."""
    from tests.distributed_worker import evaluation_forward

    steps, model = 4, small_model()
    evaluation_forward(model)
    train(model, cfg(steps=steps, bias_rate=0.05), token_data(batch=4), labelled_loss, tmp_path / "single")
    torchrun(tmp_path / "dist", steps, -1, "evaluated")
    single, two = train_losses(tmp_path / "single"), train_losses(tmp_path / "dist")
    for step in range(1, steps + 1):
        assert two[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step


def test_bf16_parameters_with_fp32_reductions_train_like_fp32(tmp_path):
    steps = 4
    train(small_model(), cfg(steps=steps, bias_rate=0.05), token_data(batch=4), labelled_loss, tmp_path / "single")
    torchrun(tmp_path / "dist", steps, -1, "bf16")
    fp32, bf16 = train_losses(tmp_path / "single"), train_losses(tmp_path / "dist")
    for step in range(1, steps + 1):
        assert bf16[step] == pytest.approx(fp32[step], rel=2e-2), step  # bf16 rounding, not a different run
        assert bf16[step] != fp32[step]  # it really computed in bf16
    state = torch.load(tmp_path / "dist" / "ckpt" / f"step_{steps:06d}" / "trainer_0.pt", weights_only=False)
    exported = herd.from_pretrained(tmp_path / "dist" / "hf")
    assert all(p.dtype == torch.float32 for p in exported.parameters()) and state["step"] == steps


def test_two_processes_train_the_joint_stage_as_one_does(tmp_path):
    """`herd train --stages=joint` under torchrun: each rank packs its own code and caption rows and
    runs the vision tower on its own images; the losses equal one process's on the same global batch.
    With 3 scenes (3 caption rows) rank 1's every second batch holds no image, the case where the
    ranks would wait on each other's FSDP2 collectives if it skipped the vision tower."""
    from herd.cli import main
    from herd.data.datasets import scene_documents
    from herd.data.images import ImageProcessor
    from herd.data.packing import PackedLoader
    from herd.tokenizer import Tokenizer
    from herd.train.config import smoke

    steps, common = smoke().joint_steps, ["smoke", "--stages=joint", "--images=3", "--code_bytes=100000",
                                          "--caption_fraction=0.25"]  # 2 caption rows of 8, 1 per rank
    assert main(["train", *common, "--batch_size=8", f"--out={tmp_path / 'single'}"]) == 0
    tokenizer = tmp_path / "single" / "tokenizer"
    run_processes("-m", "herd.cli", "train", *common, "--batch_size=4", f"--tokenizer={tokenizer}",
                  f"--out={tmp_path / 'two'}")
    single, two = train_losses(tmp_path / "single"), train_losses(tmp_path / "two")
    assert sorted(single) == sorted(two) == list(range(1, steps + 1))
    for step in single:
        assert two[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step

    # the case this test is for: a step where rank 1 has no image (1 caption row per rank, seed + 7)
    seed = smoke().train.seed
    docs = scene_documents(Tokenizer.from_dir(tokenizer), ImageProcessor(tile_size=64, patch_size=8, max_tiles=1), 3,
                           seed=seed)
    rank1 = PackedLoader(docs, seq_len=128, batch_size=1, pad_id=0, seed=seed + 7, rank=1, world_size=2,
                         whole_documents=True, tile_shape=(3, 64, 64))
    assert [next(rank1).pixel_values.shape[0] for _ in range(steps)] == [1, 0, 1, 0]


@pytest.mark.slow  # quick variants: test_distill's `herd train --teacher` in one process, the distill and bf16 tests above
def test_herd_train_distils_under_torchrun_with_a_sharded_teacher_in_bf16(tmp_path):
    """`herd train --teacher=DIR --bf16` on 2 processes: the teacher is sharded like the student, the
    distillation terms are logged, and the losses follow the one-process fp32 run at twice the batch
    within bf16 rounding (close, not equal: bf16 really computed)."""
    from herd.cli import main
    from tests.test_distill import tokenizer_and_teacher

    common = ["smoke", "--stages=text", "--code_bytes=100000", *tokenizer_and_teacher(tmp_path)]
    assert main(["train", *common, "--batch_size=8", f"--out={tmp_path / 'single'}"]) == 0
    run_processes("-m", "herd.cli", "train", *common, "--batch_size=4", "--bf16", f"--out={tmp_path / 'two'}")
    single, two = train_records(tmp_path / "single"), train_records(tmp_path / "two")
    assert single.keys() == two.keys()
    for step in single:
        for name in ("loss", "hard_loss", "soft_loss", "teacher_loss"):
            assert two[step][name] == pytest.approx(single[step][name], rel=2e-2), (step, name)
        assert two[step]["loss"] != single[step]["loss"]
        assert two[step]["soft_weight"] == pytest.approx(0.9)
    exported = herd.from_pretrained(tmp_path / "two" / "model")
    assert all(p.dtype == torch.float32 for p in exported.parameters())  # fp32 master weights


def test_mesh_settings_without_torchrun_are_refused(tmp_path, capsys):
    from herd.cli import main

    assert main(["train", "smoke", "--bf16", f"--out={tmp_path}"]) == 2
    assert "applies under torchrun" in capsys.readouterr().err
    assert main(["train", "smoke", "--expert_parallel=2", f"--out={tmp_path}"]) == 2
    assert "torchrun job's mesh" in capsys.readouterr().err


def test_which_stages_run_under_torchrun(capsys):
    from herd.pipeline import distributed_recipes
    from herd.train.config import STAGES
    from herd.train.recipes import RECIPES

    named = [RECIPES[s] for s in STAGES]
    assert distributed_recipes(named, main_rank=True) == named[1:]  # all but contrastive
    assert "skipping contrastive" in capsys.readouterr().out
    post = [RECIPES[s] for s in ("sft", "rl", "dpo")]
    assert distributed_recipes(post, main_rank=True) == post
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------------
# Post-training under torchrun: generation on a plain copy per rank, training on FSDP2
# ------------------------------------------------------------------------------------------------

def post_training_checkpoint(tmp_path, tiny_checkpoint) -> list[str]:
    """A copy of the shared tiny checkpoint (never written into) and `herd train` arguments that
    post-train it at smoke scale."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    return ["smoke", f"--init={ckpt}", "--code_bytes=100000", "--answer_tokens=8", "--post_eval_problems=2"]


def user_data(tmp_path) -> Path:
    """Conversations and preference pairs in one JSONL file (TRL's formats)."""
    chats = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                           {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 2))}]}
             for i in range(16)]
    # not symmetric (a yes/no swap would give gradients that cancel to rounding noise, which AdamW amplifies)
    prefs = [{"prompt": f"Is {i} odd?", "chosen": f"{i} is {'odd' if i % 2 else 'even'}.", "rejected": "I do not know."}
             for i in range(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in chats + prefs) + "\n")
    return data


def one_and_two_processes(tmp_path, tiny_checkpoint, args: list[str], single: list[str], two: list[str]):
    """`herd train ARGS` post-training a copy of the tiny checkpoint, in one process with `single`
    and under torchrun on 2 with `two`; returns both runs' train records."""
    from herd.cli import main

    common = [*post_training_checkpoint(tmp_path, tiny_checkpoint), *args]
    assert main(["train", *common, *single, f"--out={tmp_path / 'single'}"]) == 0
    run_processes("-m", "herd.cli", "train", *common, *two, f"--out={tmp_path / 'two'}")
    return stage_records(tmp_path / "single"), stage_records(tmp_path / "two")


def test_two_processes_fine_tune_as_one_does(tmp_path, tiny_checkpoint):
    """`herd train --init=CKPT --stages=sft --sft_data=...` under torchrun: the answer losses that
    tag difficulty are computed by each rank for a block of the conversations and all-gathered, so
    every rank keeps the same documents and packs its rows of the same global batch; the held-out
    accuracy is generated by each rank on a plain copy of the weights, for its block of the problems.
    The losses equal one process's at twice the per-rank batch, and so do the final weights."""
    from safetensors.torch import load_file

    single, two = one_and_two_processes(tmp_path, tiny_checkpoint,
                                        ["--stages=sft", f"--sft_data={user_data(tmp_path)}", "--easy_loss=0"],
                                        ["--batch_size=4"], ["--batch_size=2"])
    assert single.keys() == two.keys() == {("sft", s) for s in (1, 2, 3)}
    for key in single:
        assert two[key]["loss"] == pytest.approx(single[key]["loss"], rel=1e-5, abs=1e-6), key
    a, b = (load_file(next((tmp_path / run / "model").glob("*.safetensors"))) for run in ("single", "two"))
    assert a.keys() == b.keys()
    for name in a:  # AdamW may turn an element's rounding-level gradient into a step of up to lr (1e-3)
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["task_accuracy"].keys() == {"pretrained", "sft"}


def test_two_processes_prefer_as_one_does(tmp_path, tiny_checkpoint):
    """`herd train --init=CKPT --stages=dpo --dpo_data=...` under torchrun: each rank trains on its
    block of every global batch of pairs, against a frozen reference sharded like the model. The
    first loss is log 2 on both, and the losses equal one process's at twice the per-rank pairs."""
    single, two = one_and_two_processes(tmp_path, tiny_checkpoint,
                                        ["--stages=dpo", f"--dpo_data={user_data(tmp_path)}", "--dpo_lr=1e-3"],
                                        ["--dpo_pairs=4"], ["--dpo_pairs=2"])
    assert single.keys() == two.keys() == {("dpo", s) for s in (1, 2, 3)}
    for records in (single, two):
        assert records[("dpo", 1)]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert two[("dpo", 3)]["loss"] < math.log(2) - 0.1  # the policy moved away from its reference
    for key in single:  # DPO's loss is a difference of differences of summed log-probabilities (tens of
        # nats each, in fp32): another order of the gradient sums shows at ~1e-5 after two steps
        for name in ("loss", "reward_margin", "reward_accuracy"):
            assert two[key][name] == pytest.approx(single[key][name], rel=1e-4, abs=1e-6), (key, name)


def test_two_processes_post_train_on_the_tasks_as_one_does(tmp_path, tiny_checkpoint):
    """`torchrun -m herd.cli train --init=CKPT --stages=sft,rl,dpo`: every generation (held-out
    accuracy, SFT's pass@k tags, RL's rollouts and re-filtering, DPO's sampled pairs) runs on a plain
    copy of the weights per rank, each rank a block of the rows, seeded as one process seeds them.
    So the tags, the pairs and the training equal one process's at twice the per-rank batch; the
    task conversations about images make steps where a rank has no image (empty tiles then)."""
    from herd.cli import main

    common = [*post_training_checkpoint(tmp_path, tiny_checkpoint), "--stages=sft,rl,dpo"]
    assert main(["train", *common, "--batch_size=4", "--rl_prompts=4", "--dpo_pairs=4",
                 f"--out={tmp_path / 'single'}"]) == 0
    run_processes("-m", "herd.cli", "train", *common, "--batch_size=2", "--rl_prompts=2", "--dpo_pairs=2",
                  f"--out={tmp_path / 'two'}")
    single, two = stage_records(tmp_path / "single"), stage_records(tmp_path / "two")
    assert single.keys() == two.keys() == {(stage, s) for stage in ("sft", "rl", "dpo") for s in (1, 2, 3)}
    for key in single:
        rel = 1e-4 if key[0] == "dpo" else 1e-5  # DPO's difference of summed log-probabilities: see above
        for name in ("loss", "rollouts") if key[0] == "rl" else ("loss",):
            assert two[key][name] == pytest.approx(single[key][name], rel=rel, abs=1e-6), (key, name)
    assert two[("dpo", 1)]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("single", "two")]
    assert summaries[0]["stages"]["dpo"]["pairs"] == summaries[1]["stages"]["dpo"]["pairs"] > 0
    assert summaries[1]["task_accuracy"].keys() == {"pretrained", "sft", "rl", "dpo"}
    assert (tmp_path / "two" / "base" / "tokenizer.json").exists()  # the start, kept beside model/


def stage_records(run_dir: Path) -> dict[tuple[str, int], dict]:
    return {(r["stage"], r["step"]): r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def test_two_processes_run_online_rl_and_resume_it(tmp_path, tiny_checkpoint):
    """`herd train`'s RL stage under torchrun (tests/distributed_worker.py `lucky_rl`: a checker
    whose verdicts vary, so groups have signal): each rank samples its block of the global batch of
    prompts on its own plain copy of the policy (refreshed before every step), the pool is
    re-filtered by the ranks together, and the logged metrics cover every rank: as many rollouts a
    step as one process makes at twice the prompts. Not equal to one process otherwise: each rank
    refills its own batch after dropping zero-advantage groups, so the kept groups (and the token
    count the loss divides by) depend on which rank sampled them. Resumed from its sharded
    checkpoint (each rank's rollout state in its trainer file), it continues with the same losses."""
    from herd.pipeline import run
    from tests.distributed_worker import lucky_rl, rl_config

    steps, ckpt = 3, tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    run(rl_config(tmp_path / "single", str(ckpt), steps, prompts=4), stages=[lucky_rl])
    torchrun(tmp_path / "two", steps, -1, "rl", str(ckpt))
    single, two = stage_records(tmp_path / "single"), stage_records(tmp_path / "two")
    assert single.keys() == two.keys() == {("rl", s) for s in range(1, steps + 1)}
    for key, record in two.items():
        assert record["rollouts"] == single[key]["rollouts"] == 4 * 2, key  # prompts x group, over the ranks
        assert record["draws"] == 1 and math.isfinite(record["loss"]) and record["kl"] >= 0
    first = two[("rl", 1)]  # the policy is its reference: any gradient comes from the advantages
    assert first["zero_advantage_groups"] < 1 and first["grad_norm"] > 0
    assert two[("rl", steps)]["kl"] > 1e-6  # the policy moved away from its sharded reference

    ckpts = tmp_path / "two" / "checkpoints" / "rl"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step")) == ["step_000002", "step_000003"]
    shutil.rmtree(ckpts / "step_000003")
    (tmp_path / "two" / "metrics.jsonl").write_text("")
    torchrun(tmp_path / "two", steps, -1, "rl", str(ckpt))
    resumed = stage_records(tmp_path / "two")
    assert resumed.keys() == {("rl", steps)}
    for name in ("loss", "grad_norm", "kl", "reward", "zero_advantage_groups", "pool"):
        assert resumed[("rl", steps)][name] == pytest.approx(two[("rl", steps)][name], rel=1e-6,
                                                                   abs=1e-7), name


@pytest.mark.slow
def test_four_processes_on_a_two_dimensional_mesh_match_one(tmp_path):
    """2 data-parallel replicas x (FSDP + expert parallelism over 2 ranks): HSDP for the dense
    weights, experts split inside each pair and their gradients all-reduced across the pairs; the
    losses equal one process's on the same global batch (4 ranks x 2 rows), and so do the weights."""
    steps = 4
    reference = small_model()
    train(reference, cfg(steps=steps, bias_rate=0.05), token_data(batch=8), labelled_loss, tmp_path / "single")
    run_processes(str(WORKER), str(tmp_path / "dist"), str(steps), "-1", "2d", processes=4)
    single, four = train_losses(tmp_path / "single"), train_losses(tmp_path / "dist")
    for step in range(1, steps + 1):
        assert four[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step
    exported = herd.from_pretrained(tmp_path / "dist" / "hf")
    for m in reference.modules():
        if hasattr(m, "selection_bias"):
            m.selection_bias = None
    ids = torch.randint(3, 60, (1, 12))
    torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
