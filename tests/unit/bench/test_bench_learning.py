"""bench_learning's arithmetic on synthetic runs: the target, time to target (absent when not reached), the ratio."""

from bench.bench_learning import summarize, time_to, trailing_mean


def _run(rewards, seconds_per_step):
    return {"steps": list(range(1, len(rewards) + 1)), "seconds": [seconds_per_step * (i + 1) for i in range(len(rewards))],
            "reward": rewards, "smoothed": trailing_mean(rewards, 2), "final": sum(rewards[-2:]) / 2,
            "learner_idle": 0.1, "actor_idle_end": 0.2, "staleness_mean": 0.0}  # fmt: skip


def test_trailing_mean_and_time_to_target():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    run = _run([1.0, 1.0, 2.0, 3.0, 3.0], 10.0)
    assert time_to(run, 2.5, smooth=2) == 40.0
    assert time_to(run, 9.0, smooth=2) is None  # never a number for "not reached"


def test_summary_sets_the_target_from_eta0_and_compares_eta2():
    slow = [_run([1.0, 1.0, 2.0, 3.0, 3.0], 10.0), _run([1.0, 1.0, 1.0, 2.0, 4.0], 10.0)]
    fast = [_run([1.0, 1.0, 2.0, 3.0, 3.0], 5.0), _run([1.0, 1.0, 2.0, 3.0, 3.0], 5.0)]
    never = [_run([1.0] * 5, 5.0)]
    s = summarize({("flow_grpo", 0): slow, ("flow_grpo", 2): fast, ("nft", 0): never}, 0.5, None, 2)
    assert s["initial"] == 1.0 and s["final"] == 3.0 and s["target"] == 2.0
    assert s["table"]["flow_grpo/eta0"]["time_to_target_s"]["median"] == 45.0  # 40 and 50
    assert s["table"]["flow_grpo/eta2"]["time_to_target_s"]["median"] == 20.0
    assert s["speedup_eta2"] == 45.0 / 20.0
    assert s["table"]["nft/eta0"]["time_to_target_s"] is None and s["table"]["nft/eta0"]["reached"] == "0/1"
    assert summarize({("flow_grpo", 0): slow}, 0.5, 0.5, 2)["target"] == 2.5  # --margin: final - margin
