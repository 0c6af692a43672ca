"""The method interface: every method configured in conf/method/ runs a stream, a new method
is one file and one yaml (the README's snippet runs as written), and bad settings are refused."""

import json
from pathlib import Path

import pytest

from cl_bench.errors import ConfigError
from cl_bench.stream_run import run
from tests.conftest import METHOD_NAMES, ROOT, TINY


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_runs_the_stream(make_config, name):
    small = {
        "ewc": ["method.num_samples=4"],
        "fggm": ["method.num_samples=4"],
        "gere": ["method.num_samples=4", "method.generate_tokens=16"],
    }.get(name, [])
    cfg = make_config(f"method={name}", "tasks.order=[arith,code,simplify]", *small)
    recorder = run(cfg, cfg.paths.output_dir)
    assert recorder.status == "finished" and len(recorder.R) == 4


def test_a_new_method_is_one_file_and_one_yaml(make_config):
    cfg = make_config(
        f"hydra.searchpath=[file://{ROOT / 'tests' / 'plugin_example'}]", "method=l2_init", "tasks.order=[arith,code]"
    )
    assert cfg.method._target_ == "tests.plugin_example.l2_init.L2Init"
    recorder = run(cfg, cfg.paths.output_dir)
    assert recorder.status == "finished"
    bad = make_config(
        f"hydra.searchpath=[file://{ROOT / 'tests' / 'plugin_example'}]", "method=l2_init", "method.weight=-1"
    )
    with pytest.raises(ConfigError, match=r"^method.weight must be >= 0, got -1$"):
        run(bad, bad.paths.output_dir)


@pytest.mark.processes
def test_the_readme_s_adding_a_method_snippet_runs_as_written(tmp_path):
    """The README's two blocks written where their first lines say, into a copy of the repo's
    methods/, conf/ and runners/, run through the real runner; without its import line the plugin
    fails in one line that names the file, the line and the NameError."""
    import re
    import shutil

    from tests.launch import run_module

    section = (ROOT / "README.md").read_text().split("### Adding a method", 1)[1]
    blocks = re.findall(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", section, re.S)[:2]
    assert [path for path, _ in blocks] == ["methods/l2_init.py", "conf/method/l2_init.yaml"]
    repo = tmp_path / "repo"
    for folder in ("methods", "conf", "runners"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for path, text in blocks:
        (repo / path).write_text(text)
    args = ["method=l2_init", *TINY, "tasks.order=[arith]"]
    done = run_module("runners.cl", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=repo)  # a copy: a new interpreter
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "finished"
    plugin = repo / "methods" / "l2_init.py"
    plugin.write_text(plugin.read_text().replace("from methods.base import CLMethod\n", ""))
    failed = run_module("runners.cl", *args, f"hydra.run.dir={tmp_path / 'broken'}", cwd=repo)
    line = next(ln for ln in failed.stderr.splitlines() if ln.startswith("Error: "))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert re.fullmatch(
        r"Error: cannot import methods\.l2_init\.L2Init: \S+/methods/l2_init\.py:\d+: "
        r"NameError: name 'CLMethod' is not defined",
        line,
    ), line


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=fggm", "method.alpha=1.0"], r"method.alpha must be in \(0, 1\)"),
        (["method=fggm", "method.alpha=0"], r"method.alpha must be in \(0, 1\)"),
        (["method=migu", "method.threshold=1.5"], r"method.threshold must be in \(0, 1\)"),
        (["method=ewc", "method.lambda_=-1"], "method.lambda_ must be >= 0"),
        # issue 37.18: a setting the class does not take was Hydra's 5 lines, no key path
        (["method=ewc", "+method.lamdba=2"], r"^method.lamdba: EWC takes no such setting; it takes lambda_, mode"),
        (
            ["learning=grpo", "+learning.bogus=1"],
            r"^learning.bogus: GRPO takes no such setting; it takes loss_type, .*, kl_telemetry$",
        ),
        (["method=ewc", "method.num_samples=0"], "method.num_samples must be an integer >= 1"),
        (["method=fggm", "method.aggregate=block"], "method.aggregate must be one of"),
        (["method=fggm", "method.quantile_scope=local"], "quantile_scope must be one of"),
        (["method=ewc", "method.mode=both"], "method.mode must be one of"),
        (["method=fggm", "method.param_patterns=[nothing.*]"], r"method.param_patterns \['nothing.\*'\] match no"),
        (["method=migu", "method.module_patterns=[nothing]"], "method.module_patterns .* match no nn.Linear"),
        (["method=hft", "method.block_pattern=blocks"], "match no transformer block"),
        (["method=fggm", "trainer.strategy=fsdp"], r"trainer.strategy is fsdp1, .* use trainer=fsdp \(FSDP2"),
        (["method=fggm", "trainer.strategy=deepspeed_stage_2"], "trainer.strategy is deepspeed, which is not one"),
        (["method=ewc", "trainer=deepspeed"], "method ewc supports .*trainer.strategy is deepspeed"),
        (["method=ewc_trace", "trainer=fsdp"], "method ewc_trace supports .*trainer.strategy is fsdp"),
        (["method=lwf", "trainer=fsdp"], "under trainer=fsdp use method.teacher=topk"),
    ],
)
def test_bad_method_settings_fail_before_training(make_config, overrides, message):
    cfg = make_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        run(cfg, cfg.paths.output_dir)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_sft_is_allowed_under_every_strategy():
    from methods.sft import SFT

    for strategy in (
        "auto",
        "ddp",
        "deepspeed_stage_2",
        {"_target_": "lightning.pytorch.strategies.DDPStrategy"},
        {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"},
    ):
        SFT().check_strategy(strategy, 2)
