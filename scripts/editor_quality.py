"""How good an editor is before RL: reconstruction and edit quality of a flow checkpoint on the quickstart tasks.

For every task (instruction, procedural source) it samples G edits with the given sampler settings (the demo's by
default) and scores them with the strict ``metric`` reward; the identity edit (the source itself) is scored too.
Per instruction it reports the edits' mean SC against the identity edit's SC, the structure kept (the metric's
luminance-normalised SSIM x contrast kept), plain grey SSIM, and the overall reward; for the VAE, the structure of
``decode(encode(source))``. An editor passes when, for every instruction, its SC beats the identity edit's SC while
the mean structure kept stays >= 0.8 (issue 12: an editor that only copies its input is not an editor).

    python -m editrl.scripts.editor_quality MODEL_DIR [--tasks N] [--group-size G] [--json PATH] [--noise-level A] [--steps N] [--sde-window K]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editrl.common.config import PolicyConfig, SamplerConfig
from editrl.common.families.base import load_policy
from editrl.common.tasks import load_source_image, load_tasks, make_quickstart_tasks
from editrl.scorer.backend import ScoreRequest
from editrl.scorer.metric import MetricBackend, ssim_normalised

MIN_STRUCTURE = 0.8
# configs/quickstart.yaml's sampler: Flow-GRPO SDE (noise level 0.7) on the first 3 of 4 steps, ODE on the last
DEMO_SAMPLER = SamplerConfig(num_steps=4, noise_level=0.7, guidance=2.5, sde_window=3, sde_window_range=[0, 3])


def _grey(image: Any) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return rgb @ np.array([0.299, 0.587, 0.114])


def _reconstruction(policy: Any, source: Any) -> float:
    """Structure kept by the VAE alone: decode(encode(source)) against the source (the metric's measure)."""
    cond = policy.encode_condition("make it red", source)
    pipe = policy.pipeline
    side = cond.height // pipe.vae_scale_factor
    latents = pipe._unpack_latents(cond.image_latents[None], cond.height, cond.width, pipe.vae_scale_factor)
    cfg = pipe.vae.config
    with torch.no_grad():
        image = pipe.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample
    decoded = pipe.image_processor.postprocess(image, output_type="pil")[0]
    del side
    return ssim_normalised(_grey(source), _grey(decoded))


def evaluate(
    model_dir: str | Path, n_tasks: int = 20, group_size: int = 4, sampler: SamplerConfig | None = None, seed: int = 0
) -> dict[str, Any]:
    """The report (see the module docstring) as a dict: per instruction and overall, plus ``passed``."""
    policy_cfg = PolicyConfig(family="flow", model=str(model_dir), sampler=sampler or DEMO_SAMPLER)
    policy = load_policy(policy_cfg, with_pipeline=True)
    metric = MetricBackend()
    with tempfile.TemporaryDirectory() as tmp:
        size = int(json.loads((Path(model_dir) / "editrl_tiny.json").read_text()).get("recipe", {}).get("size", 64))
        tasks = load_tasks(make_quickstart_tasks(tmp, n_tasks=n_tasks, size=size, seed=seed))
        sources = [load_source_image(task) for task in tasks]
    rows: dict[str, dict[str, list[float]]] = {}
    generator = torch.Generator().manual_seed(seed)
    for task, source in zip(tasks, sources, strict=True):
        rollout = policy.sample(task.instruction, source, group_size, generator)
        request = ScoreRequest(task.task_id, task.instruction, task.task_type, source, [source, *rollout.images])
        identity, *edits = metric.score(request)
        row = rows.setdefault(task.instruction, {k: [] for k in ("sc", "sc_identity", "structure", "ssim", "overall")})
        row["sc_identity"].append(identity.sub_scores["SC"])
        for score in edits:
            row["sc"].append(score.sub_scores["SC"])
            row["structure"].append(score.sub_scores["structure"])
            row["ssim"].append(score.sub_scores["ssim"])
            row["overall"].append(float(score.overall))
    recon = [_reconstruction(policy, source) for source in sources]
    report: dict[str, Any] = {"instructions": {}, "vae_structure_mean": statistics.fmean(recon)}
    report["vae_structure_min"] = min(recon)
    passed = True
    for instruction, row in rows.items():
        means = {k: statistics.fmean(v) for k, v in row.items()}
        ok = means["sc"] > means["sc_identity"] and means["structure"] >= MIN_STRUCTURE
        passed &= ok
        report["instructions"][instruction] = {**means, "passed": ok}
    every = [v for row in rows.values() for v in row["overall"]]
    report["overall_mean"] = statistics.fmean(every)
    report["structure_mean"] = statistics.fmean(v for row in rows.values() for v in row["structure"])
    report["passed"] = passed
    report["settings"] = {"tasks": n_tasks, "group_size": group_size, "sampler": vars(policy_cfg.sampler), "seed": seed}
    return report


def print_report(report: dict[str, Any]) -> None:
    print("| instruction | SC edits | SC identity | structure kept | plain SSIM | overall | passes |")
    print("|---|---|---|---|---|---|---|")
    for instruction, row in report["instructions"].items():
        print(
            f"| {instruction} | {row['sc']:.2f} | {row['sc_identity']:.2f} | {row['structure']:.3f} | "
            f"{row['ssim']:.3f} | {row['overall']:.2f} | {'yes' if row['passed'] else 'NO'} |"
        )
    print(
        f"overall reward {report['overall_mean']:.2f}, structure kept {report['structure_mean']:.3f}; VAE reconstruction"
        f" structure {report['vae_structure_mean']:.3f} (min {report['vae_structure_min']:.3f}); "
        f"{'PASSED' if report['passed'] else 'FAILED'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument(
        "--noise-level", type=float, default=None, help="the sampler's noise level (default: the demo's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the demo's)")
    parser.add_argument("--sde-window", type=int, default=None, help="stochastic steps (default: the demo's)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    sampler = DEMO_SAMPLER
    if args.noise_level is not None:
        sampler = replace(sampler, noise_level=args.noise_level)
    if args.steps is not None:
        sampler = replace(sampler, num_steps=args.steps)
    if args.sde_window is not None:
        sampler = replace(sampler, sde_window=args.sde_window)
    report = evaluate(args.model_dir, args.tasks, args.group_size, sampler)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
