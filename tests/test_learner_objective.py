"""The learner and critic apply the configured objective exactly, independent of how a batch is cut
into micro-batches (DeepSpeed gradient accumulation), in-process with real DeepSpeed (gloo, 1 rank)."""
import pytest
import torch

from common.net import free_port
from rl.critic import Critic
from rl.learner import Learner
from rl.settings import algo_settings, learner_settings
from rollout.trajectory import Trajectory, collate

N = 8


def varied_batch(seed=0):
    """8 sequences with different prompt and response lengths, a multi-turn one with an env turn."""
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for i in range(N):
        prompt = torch.randint(3, 60, (2 + i % 3,), generator=g).tolist()
        t = Trajectory(prompt_ids=prompt)
        t.add_policy_tokens(torch.randint(3, 60, (1 + (5 * i) % 7,), generator=g).tolist(), [0.0] * (1 + (5 * i) % 7), 0)
        if i == 3:  # multi-turn: env tokens (masked) then another policy turn
            t.add_env_tokens([5, 6, 7])
            t.add_policy_tokens([8, 9], [0.0, 0.0], 0)
        trajs.append(t)
    batch = collate(trajs, 0)
    batch["advantages"] = torch.randn(batch["loss_mask"].shape, generator=g) * batch["loss_mask"]
    return batch


@pytest.fixture(scope="module")
def model_path(tiny_path):
    return tiny_path("qwen3_5")


def one_step(path, micro, loss_agg, entropy_coef=0.0):
    s = learner_settings(micro_batch_size=micro, lr=1e-2, zero_stage=2)
    learner = Learner(path, s, algo_settings(loss_agg=loss_agg, loss_norm_tokens=8, entropy_coef=entropy_coef),
                      0, 1, "127.0.0.1", free_port(), N)
    stats = learner.train(varied_batch())
    params = {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()}
    return stats, params


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_update(model_path, loss_agg):
    """One micro-batch of 8 and four of 2 (gradient accumulation) give the same gradient norm,
    loss and weights: losses are aggregated over the whole mini-batch, not per micro-batch (the
    sequences have different lengths, so per-micro-batch token means would differ)."""
    full, p_full = one_step(model_path, N, loss_agg, entropy_coef=0.01)
    accum, p_accum = one_step(model_path, 2, loss_agg, entropy_coef=0.01)
    assert full["train/grad_norm"] > 0
    assert accum["train/grad_norm"] == pytest.approx(full["train/grad_norm"], rel=1e-4)
    assert accum["train/loss"] == pytest.approx(full["train/loss"], rel=1e-4, abs=1e-7)
    # Adam's first step is ~lr·sign(g): entries whose gradient is ~0 may differ by rounding; a wrong
    # (per-micro-batch) aggregation moves ~8% of the entries by > 1e-3 and the mean by ~2e-3.
    diffs = torch.cat([(p_full[n] - p_accum[n]).abs().flatten() for n in p_full])
    assert diffs.mean().item() < 1e-6 and (diffs > 1e-3).sum().item() == 0, (diffs.mean(), diffs.max())


def test_entropy_bonus_changes_the_update(model_path):
    _, base = one_step(model_path, N, "token-mean")
    _, bonus = one_step(model_path, N, "token-mean", entropy_coef=0.5)
    assert max((base[n] - bonus[n]).abs().max().item() for n in base) > 1e-4


def test_critic_starts_at_zero_and_fits_returns(model_path):
    critic = Critic(model_path, learner_settings(micro_batch_size=4, lr=1e-2, zero_stage=2), value_clip=None,
                    master_port=free_port(), samples_per_step=N)
    batch = varied_batch(1)
    v0 = critic.values(batch)
    assert v0.shape == batch["loss_mask"].shape and v0.abs().max().item() == 0.0  # zero-initialised head
    batch["returns"] = torch.linspace(-1, 1, N).unsqueeze(1) * batch["loss_mask"]
    batch["values"] = v0
    mses = [critic.train(batch)["critic/mse"] for _ in range(8)]
    assert mses[-1] < 0.5 * mses[0], mses
    v = critic.values(batch)
    assert (v * (1 - batch["loss_mask"])).abs().max().item() == 0.0  # no values off policy tokens


def test_bf16_stage0_first_update_is_adams(model_path):
    """bf16 on ZeRO stage 0 (what one GPU rank runs: DeepSpeed's per-parameter fp32-master wrapper) gives
    the fp32 learner's gradient norm with gradient accumulation and Adam's first update (~lr per weight,
    not the ~0.74 lr left by the wrapper's start-up step on zero gradients), to bf16 rounding."""
    updates, norms = {}, {}
    for dtype, stage in (("float32", 2), ("bfloat16", 0)):
        s = learner_settings(micro_batch_size=2, lr=1e-2, zero_stage=stage, dtype=dtype)
        learner = Learner(model_path, s, algo_settings(), 0, 1, "127.0.0.1", free_port(), N)
        before = {n: p.detach().float().clone() for n, p in learner.engine.module.named_parameters()}
        norms[dtype] = learner.train(varied_batch())["train/grad_norm"]
        updates[dtype] = {n: p.detach().float() - before[n] for n, p in learner.engine.module.named_parameters()}
        getattr(learner.engine, "destroy", lambda: None)()
    assert norms["bfloat16"] == pytest.approx(norms["float32"], rel=0.05)
    ref = torch.cat([u.flatten() for u in updates["float32"].values()])
    got = torch.cat([updates["bfloat16"][n].flatten() for n in updates["float32"]])
    assert ref.abs().mean() > 5e-3  # Adam's first step: ~lr on most weights
    assert float(got.abs().mean()) == pytest.approx(float(ref.abs().mean()), rel=0.03)
    # bf16 forward/backward flips the sign of some near-zero gradients (those entries move by 2 lr); the rest
    # agree to bf16 rounding of the weights
    close = ((got - ref).abs() < 1e-3).float().mean()
    assert close > 0.8 and (got - ref).abs().median() < 5e-4, (close, (got - ref).abs().median())


def test_bf16_stage0_skips_a_step_with_nan_gradients(model_path):
    """The one-sync inf/NaN check that replaces the wrapper's per-parameter one still skips a step whose
    gradients are not finite (weights unchanged) and lets a finite step through."""
    s = learner_settings(micro_batch_size=4, lr=1e-2, zero_stage=0, dtype="bfloat16")
    learner = Learner(model_path, s, algo_settings(), 0, 1, "127.0.0.1", free_port(), N)
    checker = learner.engine.optimizer.overflow_checker
    assert checker.has_overflow_serial.__func__.__module__ == "rl.ds_worker"
    params = [p for p in learner.engine.module.parameters()]

    def weights():
        return torch.cat([p.detach().float().flatten() for p in params])

    start = weights()
    bad = varied_batch()
    bad["advantages"] = bad["advantages"] * float("nan")
    learner.train(bad)
    assert torch.equal(weights(), start)  # skipped
    learner.train(varied_batch())
    assert not torch.equal(weights(), start)
    grads = [torch.ones(3), torch.tensor([1.0, float("inf")])]
    fake = [type("P", (), {"grad": g})() for g in grads]
    assert checker.has_overflow_serial(fake) and not checker.has_overflow_serial(fake[:1])
    getattr(learner.engine, "destroy", lambda: None)()


def test_lean_stage0_step_equals_deepspeeds(model_path):
    """The multi-tensor step that replaces DeepSpeed's per-parameter stage-0 step gives the same gradient norm
    and the same bf16 weights over two steps (the norm is summed in another order: ~1e-7 apart)."""
    runs = []
    for lean in (True, False):
        s = learner_settings(micro_batch_size=2, lr=1e-2, zero_stage=0, dtype="bfloat16", grad_clip=1.0)
        learner = Learner(model_path, s, algo_settings(), 0, 1, "127.0.0.1", free_port(), N)
        opt = learner.engine.optimizer
        assert ("step" in vars(opt)) and opt.step.__func__.__name__ == "lean_unfused_step"
        if not lean:
            del opt.step  # DeepSpeed's own FP16_UnfusedOptimizer.step
        norms = [learner.train(varied_batch(seed))["train/grad_norm"] for seed in (0, 1)]
        runs.append((norms, torch.cat([p.detach().float().flatten() for p in learner.engine.module.parameters()])))
        getattr(learner.engine, "destroy", lambda: None)()
    (n_lean, w_lean), (n_ds, w_ds) = runs
    assert n_lean == pytest.approx(n_ds, rel=1e-5) and n_ds[0] > 1.0  # clipping was active
    assert (w_lean == w_ds).float().mean() > 0.999 and (w_lean - w_ds).abs().max() < 1e-2


def test_bench_baseline_keeps_deepspeeds_own_stage0_step(model_path):
    """bench/learner_gpu.py's `+ds-step` baseline really runs DeepSpeed's stage-0 step, overflow check and
    gradient all-reduce (only the Adam start-up state is dropped), gives the same gradient norm, and puts the
    learner's own fixes back afterwards."""
    from bench.learner_gpu import deepspeed_stage0_step

    s = learner_settings(micro_batch_size=2, lr=1e-2, zero_stage=0, dtype="bfloat16")
    norms = []
    for baseline in (True, False):
        if baseline:
            with deepspeed_stage0_step():
                learner = Learner(model_path, s, algo_settings(), 0, 1, "127.0.0.1", free_port(), N)
        else:
            learner = Learner(model_path, s, algo_settings(), 0, 1, "127.0.0.1", free_port(), N)
        opt = learner.engine.optimizer
        assert not opt.optimizer.state  # the start-up step's Adam state is gone either way
        assert ("step" in vars(opt)) is not baseline
        assert (opt.overflow_checker.has_overflow_serial.__func__.__module__ == "rl.ds_worker") is not baseline
        assert learner.engine.enable_backward_allreduce is baseline
        norms.append(learner.train(varied_batch())["train/grad_norm"])
        getattr(learner.engine, "destroy", lambda: None)()
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
