"""The report's columns: GRPO's reward and skipped groups where runs have them, no column that no
row fills, and every paired column saying which way is better. The tables are read from
``markdown`` directly (no figures: milliseconds), the whole report once."""

import json
import statistics

import pytest

from cl_bench.recording.comparison import aggregate, group_runs, paired
from cl_bench.recording.reading import find_runs
from cl_bench.recording.report import markdown
from cl_bench.recording.run_results import BETTER
from tests.test_report import sweep, write_result

GRPO = {"learning": {"_target_": "cl_bench.on_policy.grpo.GRPO"}}


def telemetry(rewards: tuple[float, float], skipped: tuple[float, float]) -> dict:
    """results.json's ``learning`` of a GRPO run over tasks a and b (the keys the report reads, and
    a curve it does not)."""
    return {
        "paradigm": "grpo",
        "settings": {"num_generations": 4},
        "tasks": {
            task: {"steps": 4, "reward_mean": r, "skipped_groups": s, "curves": {"reward_mean": [r] * 4}}
            for task, r, s in zip("ab", rewards, skipped)
        },
    }


def table(md: str, heading: str) -> list[list[str]]:
    """The first Markdown table from the line starting with ``heading`` on, as rows of cells (the
    header first)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    start = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not set(line) <= set("|-"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_grpo_runs_get_reward_and_skipped_group_columns_averaged_over_tasks(tmp_path):
    from cl_bench.recording.report import write_report

    R = [[0, 0], [20, 10], [20, 30]]
    for seed in (1, 2):
        write_result(tmp_path / "runs", f"sft{seed}", "sft", seed, [[0, 0], [80, 10], [40, 90]])
        write_result(
            tmp_path / "runs",
            f"grpo{seed}",
            "sft",
            seed,
            R,
            config_extra=GRPO,
            results_extra={"learning": telemetry((0.2 * seed, 0.6), (0.5, 0.25 * seed))},
        )
        write_result(
            tmp_path / "runs",
            f"grpo_ewc{seed}",
            "ewc",
            seed,
            R,
            config_extra=GRPO,
            results_extra={"learning": telemetry((0.1, 0.3), (0.75, 0.5))},
        )
    summary = write_report(find_runs([tmp_path / "runs"]), tmp_path / "out", baseline=["sft", "grpo"])
    rows = {g["method"]: g for g in summary["groups"]}
    reward = statistics.fmean([(0.2 + 0.6) / 2, (0.4 + 0.6) / 2])
    skipped = statistics.fmean([(0.5 + 0.25) / 2, (0.5 + 0.5) / 2])
    assert rows["grpo"]["reward"]["mean"] == pytest.approx(reward)
    assert rows["grpo"]["skipped_groups"]["mean"] == pytest.approx(skipped)
    assert rows["sft"]["reward"] == {"mean": None, "std": None, "n": 0}
    md = (tmp_path / "out" / "report.md").read_text()
    main = table(md, "| method | seeds | op |")
    head = main[0]
    cells = dict(zip(head, main[[r[0] for r in main].index("grpo")]))
    assert cells["reward"].startswith(f"{reward:.2f} ± ") and cells["skipped_groups"].startswith(f"{skipped:.2f} ± ")
    assert dict(zip(head, main[[r[0] for r in main].index("sft")]))["reward"] == "-"
    # paired with grpo, grpo+ewc's reward difference is a column; paired with sft (no reward) it is none
    with_grpo = table(md, "Paired with grpo")
    assert "reward ↑" in with_grpo[0] and "skipped_groups ↓" in with_grpo[0]
    assert "reward ↑" not in table(md, "Paired with sft")[0]
    # SFT runs alone: no such columns at all
    runs = find_runs([sweep(tmp_path / "sft_only")])
    groups = group_runs(runs)
    md = markdown(aggregate(groups), paired(groups, "sft"), [])
    assert not {"reward", "skipped_groups"} & set(table(md, "| method | seeds | op |")[0])


def test_a_column_no_row_fills_is_left_out_in_every_table(tmp_path):
    """Runs without general ability, timings or FWT (a one-task stream has none): their columns
    would be "-" in every row, so they are not there; one that some row fills stays."""
    for name, method, seed in (("s1", "sft", 1), ("s2", "sft", 2), ("e1", "ewc", 1), ("e2", "ewc", 2)):
        run = write_result(tmp_path, name, method, seed, [[0, 0], [80, 10], [40 + seed, 90]])
        record = json.loads((run / "results.json").read_text())
        record["general"] = {}
        record.pop("timings")
        record["cl_metrics"]["fwt"] = None
        if name == "e2":
            record["kl_to_base"] = [[0, 0], [0.5, 0.1], [0.7, 0.3]]  # one run of one row: a column
        (run / "results.json").write_text(json.dumps(record))
    groups = group_runs(find_runs([tmp_path]))
    md = markdown(aggregate(groups), paired(groups, "sft"), [])
    main, pairs = table(md, "| method | seeds | op |"), table(md, "Paired with sft")
    for gone in ("fwt", "delta_RG", "general_before", "general_after", "wall_min", "cpu_min"):
        assert gone not in main[0] and not any(h.startswith(gone + " ") for h in pairs[0]), gone
    assert "kl_new" in main[0]  # ewc's row has it
    assert not any(h.startswith("kl_new") for h in pairs[0])  # sft has none: no pair has it
    assert all(cell != "-" for row in pairs[1:] for cell in row)


def test_every_paired_column_says_which_way_is_better(tmp_path):
    def flips(forgotten):
        return {"forgotten": forgotten, "gained": 0.1, "forgotten_beyond_chance": None, "gained_beyond_chance": None}

    for seed in (1, 2):
        for method in ("sft", "ewc"):
            write_result(
                tmp_path,
                f"{method}{seed}",
                method,
                seed,
                [[0, 0], [80, 10], [40 + seed, 90]],
                results_extra={
                    "example_forgetting": {"a": flips(0.1 * seed)},
                    "kl_to_base": [[0, 0], [0.5, 0.1], [0.7, 0.3 * seed]],
                },
            )
    groups = group_runs(find_runs([tmp_path]))
    md = markdown(aggregate(groups), paired(groups, "sft"), [])
    head = table(md, "Paired with sft")[0]
    for metric in ("op", "bwt", "fwt", "mean_op", "new_task", "ex_gained"):
        assert f"{metric} ↑" in head, metric
    for metric in ("forgetting", "ex_forgotten", "kl_new"):
        assert f"{metric} ↓" in head, metric
    assert head[:3] == ["method", "seeds", "interval"] and len(head) == 3 + sum(" " in h for h in head)
    assert "↑: higher is better, ↓: lower is better." in md
    assert {BETTER[m] for m in ("forgetting", "ex_forgotten", "kl_new", "wf10", "skipped_groups")} == {"lower"}
