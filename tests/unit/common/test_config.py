"""Topology files: every shipped config parses; bad files fail at load time naming the dotted field path."""

from pathlib import Path

import pytest
import yaml

from editrl.common.config import ConfigError, load_config, parse_config

CONFIGS = sorted((Path(__file__).parents[3] / "configs").glob("*.yaml"))
EXAMPLES = sorted((Path(__file__).parents[3] / "configs/examples").glob("*.yaml"))


def test_configs_exist():
    assert CONFIGS and EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_parses_and_its_score_backend_builds(path):
    """The GPU examples cannot run here, but their topology and reward options must be valid (judges load lazily)."""
    from editrl.scorer.backend import make_backend

    cfg = load_config(path)
    backend = make_backend({"backend": cfg.scorers.backend, **cfg.scorers.options})
    assert backend.name == cfg.scorers.backend


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert Path(cfg.policy.model).is_absolute() and Path(cfg.data.tasks).is_absolute()
    assert cfg.broker.endpoint.startswith("tcp://127.0.0.1")


BASE = {"policy": {"model": "/m"}, "data": {"tasks": "/t.jsonl"}}


@pytest.mark.parametrize(
    "patch, path",
    [
        ({"learner": {"lr": "fast"}}, "learner.lr"),
        ({"learner": {"surprise": 1}}, "learner.surprise"),
        ({"policy": {"model": "/m", "sampler": {"num_steps": 1}}}, "policy.sampler.num_steps"),
        ({"policy": {"model": "/m", "lora": {"rank": 0}}}, "policy.lora.rank"),
        ({"data": {"tasks": "/t.jsonl", "group_size": 1}}, "data.group_size"),
        ({"policy": {"model": "/m", "family": "gan"}}, "policy.family"),
        ({"policy": {"model": "/m", "dtype": "float16"}}, "policy.dtype"),
        ({"broker": {"endpoint": "http://x"}}, "broker.endpoint"),
        ({"actors": []}, "actors"),
        ({"learner": {"nproc": 2, "groups_per_step": 3}}, "learner.groups_per_step"),
        ({"learner": {"master_port": 70000}}, "learner.master_port"),
        ({"policy": {"model": "/m", "sampler": {"sde_type": "ode"}}}, "policy.sampler.sde_type"),
        ({"policy": {"model": "/m", "sampler": {"num_steps": 4, "sde_window": 4}}}, "policy.sampler.sde_window"),
        (
            {"policy": {"model": "/m", "sampler": {"num_steps": 6, "sde_window": 2, "sde_window_range": [2, 3]}}},
            "policy.sampler.sde_window_range",
        ),
        ({"policy": {"model": "/m", "sampler": {"sde_window_range": ["a", 3]}}}, "policy.sampler.sde_window_range[0]"),
        (
            {"policy": {"model": "/m", "sampler": {"sde_window_schedule": "spiral"}}},
            "policy.sampler.sde_window_schedule",
        ),
        (
            {"policy": {"model": "/m", "sampler": {"sde_window_shift_every": 0}}},
            "policy.sampler.sde_window_shift_every",
        ),
        ({"learner": {"objective": "ppo"}}, "learner.objective"),
        ({"policy": {"model": "/m", "family": "ddim", "sampler": {"eta": 0}}}, "policy.sampler.eta"),
        ({"policy": {"model": "/m", "family": "ddim", "pipeline": "flux_kontext"}}, "policy.pipeline"),
        ({"policy": {"model": "/m", "pipeline": "sdxl"}}, "policy.pipeline"),
        ({"scorers": {"gold": {}}}, "scorers.gold.backend"),
        ({"scorers": {"gold": {"backend": "metric", "share": 0}}}, "scorers.gold.share"),
        ({"scorers": {"gold": {"backend": "metric", "share": 1.5}}}, "scorers.gold.share"),
        ({"scorers": {"gold": {"backend": "metric", "share": "most"}}}, "scorers.gold.share"),
        ({"scorers": {"gold": {"backend": "metric", "window": 0}}}, "scorers.gold.window"),
        ({"scorers": {"gold": {"backend": "metric", "min_fall": -1}}}, "scorers.gold.min_fall"),
        ({"scorers": {"gold": {"backend": "metric", "min_rise": -0.1}}}, "scorers.gold.min_rise"),
        ({"scorers": {"gold": {"backend": "metric", "options": [1]}}}, "scorers.gold.options"),
        ({"scorers": {"gold": {"backend": "metric", "shares": 0.5}}}, "scorers.gold.shares"),
        ({"scorers": {"gold": "metric"}}, "scorers.gold"),
    ],
)
def test_errors_name_the_dotted_path(patch, path):
    raw = {**BASE, **patch}
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert str(exc.value).startswith(path)


def test_yaml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_scientific_notation_and_relative_paths(tmp_path):
    (tmp_path / "topo.yaml").write_text(
        "policy: {model: ./m}\ndata: {tasks: d/t.jsonl}\nlearner: {lr: 1e-4}\nrun: {dir: runs/x}\n"
    )
    cfg = load_config(tmp_path / "topo.yaml")
    assert cfg.learner.lr == 1e-4
    assert cfg.policy.model == str((tmp_path / "m").resolve()) and cfg.run_dir == (tmp_path / "runs/x").resolve()


def test_hub_ids_are_not_turned_into_paths():
    cfg = parse_config({"policy": {"model": "black-forest-labs/FLUX.1-Kontext-dev"}, "data": {"tasks": "/t"}})
    assert cfg.policy.model == "black-forest-labs/FLUX.1-Kontext-dev"


def test_cli_exits_at_start_up_naming_the_field(tmp_path):
    import subprocess
    import sys

    (tmp_path / "topo.yaml").write_text("policy: {model: /m}\ndata: {tasks: /t}\nlearner: {lr: fast}\n")
    for role in ("broker", "actor", "scorer", "learner"):
        proc = subprocess.run(
            [sys.executable, "-m", "editrl.scripts.cli", role, "--config", str(tmp_path / "topo.yaml")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2 and "learner.lr" in proc.stderr, (role, proc.stderr)


def test_publish_interval_longer_than_the_staleness_window_is_rejected():
    with pytest.raises(ConfigError, match="learner.publish_every"):
        parse_config({**BASE, "broker": {"max_staleness": 0}, "learner": {"publish_every": 2}})


@pytest.mark.parametrize(
    "scorers, message",
    [
        ({"backend": "vlm", "options": {"engine": "gemini"}}, "unknown vlm engine 'gemini'"),
        ({"backend": "editscore", "options": {"lora": "/a"}}, "option model: required"),
        ({"backend": "oracle"}, "unknown score backend 'oracle'"),
    ],
)
def test_up_rejects_bad_scorer_options_before_starting_anything(tmp_path, scorers, message):
    import subprocess
    import sys

    import yaml

    topo = tmp_path / "topo.yaml"
    topo.write_text(yaml.safe_dump({**BASE, "run": {"dir": str(tmp_path / "run")}, "scorers": scorers}))
    proc = subprocess.run([sys.executable, "-m", "editrl.scripts.cli", "up", str(topo)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr and "scorers.options" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_gold_section_defaults_and_off_by_default(tmp_path):
    assert parse_config(BASE).scorers.gold is None
    gold = parse_config(
        {**BASE, "scorers": {"gold": {"backend": "metric", "options": {"mapping": "strict"}}}}
    ).scorers.gold
    assert (gold.backend, gold.options, gold.share, gold.window) == ("metric", {"mapping": "strict"}, 0.25, 16)
    topo = tmp_path / "sub/topo.yaml"
    topo.parent.mkdir()
    judge = {"backend": "vlm", "engine": "transformers", "engine_options": {"model": "./judge"}}
    topo.write_text(yaml.safe_dump({**BASE, "scorers": {"gold": {"backend": "vlm", "options": judge}}}))
    assert load_config(topo).scorers.gold.options["engine_options"]["model"] == str(tmp_path / "sub/judge")


def test_up_rejects_a_bad_gold_backend_naming_it_before_starting_anything(tmp_path):
    import subprocess
    import sys

    topo = tmp_path / "topo.yaml"
    scorers = {"gold": {"backend": "metric", "options": {"sc_centre": 0.3}}}
    topo.write_text(yaml.safe_dump({**BASE, "run": {"dir": str(tmp_path / "run")}, "scorers": scorers}))
    proc = subprocess.run([sys.executable, "-m", "editrl.scripts.cli", "up", str(topo)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "scorers.gold" in proc.stderr and "sc_centre" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_relative_judge_model_paths_resolve_against_the_yaml_and_hub_ids_stay(tmp_path):
    topo = tmp_path / "sub/topo.yaml"
    topo.parent.mkdir()
    scorers = {"backend": "composite", "options": {"parts": {
        "v": {"backend": "vlm", "engine": "transformers", "engine_options": {"model": "../judge"}},
        "e": {"backend": "editscore", "model": "Qwen/Qwen2.5-VL-7B-Instruct", "lora": "./adapters/es"},
    }, "overall": "v"}}  # fmt: skip
    topo.write_text(yaml.safe_dump({**BASE, "scorers": scorers}))
    parts = load_config(topo).scorers.options["parts"]
    assert parts["v"]["engine_options"]["model"] == str(tmp_path / "judge")
    assert parts["e"]["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert parts["e"]["lora"] == str(tmp_path / "sub/adapters/es")


def test_float64_is_refused_for_pipelines_without_a_float64_path(tiny_ip2p_dir):
    from editrl.common.config import parse_config
    from editrl.common.families.base import load_policy

    cfg = parse_config({"policy": {"model": str(tiny_ip2p_dir), "family": "ddim", "dtype": "float64"},
                        "data": {"tasks": "/t.jsonl"}})  # fmt: skip
    with pytest.raises(ValueError, match="policy.dtype: float64 is supported by"):
        load_policy(cfg.policy, with_pipeline=False)
