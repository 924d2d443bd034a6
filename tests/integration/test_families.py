"""Every editor family through the whole system: `editrl up` on a tiny local checkpoint trains without error, and,
with η = 0 (every group sampled by the weights the learner holds), the learner's recompute reproduces the actor's
log-probs bit for bit at every one of 6 steps, adapters non-zero from step 2 (``assert_exact_every_step``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import assert_exact_every_step, read_jsonl, write_topology


def _run(tmp_path, model_dir, tasks, policy: dict, steps: int = 6, learner: dict | None = None) -> list[dict]:
    topo = write_topology(
        tmp_path, model_dir, tasks, data={"group_size": 4}, learner=learner or {}, broker={"max_staleness": 0}
    )
    import yaml

    raw = yaml.safe_load(topo.read_text())
    raw["policy"].update(policy)
    raw["policy"]["sampler"].update(policy.get("sampler", {}))
    topo.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "editrl.scripts.cli", "up", str(topo), "--max-steps", str(steps)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert_exact_every_step(metrics, steps)
    assert (tmp_path / f"run/weights/v{steps:06d}/DONE").exists()
    return metrics


@pytest.mark.parametrize(
    "sampler",
    [{"sde_type": "cps", "noise_level": 0.8, "sde_window": 2, "sde_window_range": [0, 3]}],
    ids=["flux-cps-window"],
)
def test_flux_kontext_with_cps_and_an_sde_window(tmp_path, tiny_model_dir, quickstart_tasks, sampler):
    _run(tmp_path, tiny_model_dir, quickstart_tasks, {"sampler": sampler})


def test_instruct_pix2pix_ddim_family(tmp_path, tiny_ip2p_dir, quickstart_tasks):
    sampler = {"eta": 1.0, "guidance": 5.0, "image_guidance": 1.5}
    _run(tmp_path, tiny_ip2p_dir, quickstart_tasks, {"family": "ddim", "sampler": sampler})


def test_emu3_style_ar_family(tmp_path, tiny_emu3_dir, quickstart_tasks):
    """Token-level GRPO: per-token ratios, padding masked; clip 0.2 as usual for token policies."""
    topo_policy = {"family": "ar", "sampler": {"temperature": 1.0, "top_k": 0}}
    metrics = _run(tmp_path, tiny_emu3_dir, quickstart_tasks, topo_policy, learner={"clip_range": 0.2})
    assert all(m["learner/clip_frac"] >= 0 for m in metrics)


def test_qwen_image_edit_flow_adapter(tmp_path, tiny_qwen_edit_dir, quickstart_tasks):
    """True CFG with both branches + norm rescale, recomputed by the learner; a CPS window for good measure."""
    sampler = {"guidance": 4.0, "sde_type": "cps", "noise_level": 0.8, "sde_window": 1, "sde_window_range": [0, 2]}
    _run(tmp_path, tiny_qwen_edit_dir, quickstart_tasks, {"sampler": sampler})


def test_grpo_guard_with_a_sliding_window_trains_exactly(tmp_path, tiny_model_dir, quickstart_tasks):
    """``learner.objective: grpo_guard`` (its own prox pass with the default 2 minibatches) on FLUX-Kontext, the SDE
    window sliding with the version (issue 15): exact at every step like every objective with log-probs."""
    sampler = {"sde_window": 1, "sde_window_range": [0, 3], "sde_window_schedule": "sliding"}
    metrics = _run(
        tmp_path, tiny_model_dir, quickstart_tasks, {"sampler": sampler}, learner={"objective": "grpo_guard"}
    )
    assert all("learner/ratio_dev_max" in m and "learner/clip_frac" in m for m in metrics)
    sampled = [e for e in read_jsonl(tmp_path / "run/logs/actor-0.jsonl") if e.get("event") == "group_sampled"]
    assert {e["start"] for e in sampled} == {0, 1, 2}, sampled[:3]  # 3 positions of a 1-step window in [0, 3]
    assert all(e["start"] == e["version"] % 3 for e in sampled)  # one step further every version


def test_nft_trains_on_ode_samples_end_to_end(tmp_path, tiny_model_dir, quickstart_tasks):
    """``learner.objective: nft``: the actor samples with the ODE and stores only the final latents; the learner's
    forward-process loss trains and publishes (η = 1: staleness only makes nft's data older, nothing is weighted)."""
    topo = write_topology(tmp_path, tiny_model_dir, quickstart_tasks, data={"group_size": 4},
                          learner={"objective": "nft"})  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "editrl.scripts.cli", "up", str(topo), "--max-steps", "4"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert {"learner/nft_loss_pos", "learner/nft_loss_neg", "learner/nft_r01_mean"} <= set(m), sorted(m)
        assert "learner/logp_mismatch_max" not in m and "learner/ratio_dev_max" not in m  # no log-probs: absent
    assert metrics[0]["learner/grad_norm"] > 0
    assert (tmp_path / "run/weights/v000004/DONE").exists()
