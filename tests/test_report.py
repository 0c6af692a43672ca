"""The comparison report (runners/report.py) on hand-made results files."""

import json
import re
import statistics
import subprocess
import time
from html.parser import HTMLParser

import pytest

from cl_bench.errors import ConfigError
from cl_bench.recording.comparison import aggregate, group_runs, paired
from cl_bench.recording.intervals import bootstrap_interval
from cl_bench.recording.reading import find_runs
from tests.launch import ready, run_module

ORDER = ["a", "b"]


def write_result(
    root,
    name,
    method,
    seed,
    R,
    delta=None,
    status="finished",
    error=None,
    data_seed=0,
    extra=None,
    config_extra=None,
    results_extra=None,
):
    """A results.json as a run writes it (the keys the report reads)."""
    from cl_bench.evaluation.matrix_metrics import all_metrics

    run = root / name
    run.mkdir(parents=True)
    config = {
        "method": {"_target_": f"methods.{method}.X", "seed": seed, **(extra or {})},
        "model": {"_target_": "cl_bench.models.tiny_llama"},
        "tasks": {"_target_": "cl_bench.data.mini_stream.mini_stream", "data_seed": data_seed, "order": ORDER},
        "seed": seed,
        "paths": {"output_dir": str(run)},
        "run_name": f"{method}-s{seed}",
        "optimizer": {"lr": 1e-4},
        "train": {"batch_size": 4},
        **(config_extra or {}),
    }
    general = {"scores": {}, "delta_RG": delta, "mean": {"base": 50.0, "after_b": 50.0 + (delta or 0)}}
    (run / "results.json").write_text(
        json.dumps(
            {
                "status": status,
                "error": error,
                "tasks": ORDER,
                "stages": ["base", "after_a", "after_b"][: len(R)],
                "R": R,
                "cl_metrics": all_metrics(R) if len(R) > 1 else {},
                "general": general,
                "timings": {"total_s": 60.0, "cpu_s": 90.0 * seed},
                "config": config,
                **(results_extra or {}),
            }
        )
    )
    return run


def sweep(root):
    write_result(root, "0", "sft", 1, [[0, 0], [80, 10], [40, 90]], delta=-5)
    write_result(root, "1", "sft", 2, [[0, 0], [70, 10], [50, 70]], delta=-3)
    write_result(root, "2", "fggm", 1, [[0, 0], [80, 10], [60, 80]], delta=-1)
    write_result(root, "3", "fggm", 2, [[0, 0], [60, 10], [60, 60]], delta=0)
    write_result(
        root, "4", "fggm", 3, [[0, 0]], status="failed", error="FloatingPointError: non-finite | loss\nat step 3"
    )
    return root


def test_groups_are_aggregated_exactly_and_failed_runs_listed(tmp_path):
    runs = find_runs([sweep(tmp_path)])
    rows = {r["method"]: r for r in aggregate(group_runs(runs))}
    assert set(rows) == {"sft", "fggm"} and rows["fggm"]["seeds"] == [1, 2]
    assert rows["sft"]["op"] == {"mean": 62.5, "std": pytest.approx(statistics.stdev([65, 60])), "n": 2}
    assert rows["fggm"]["bwt"]["mean"] == pytest.approx(statistics.fmean([-20, 0]))
    assert rows["fggm"]["delta_RG"] == {"mean": -0.5, "std": pytest.approx(statistics.stdev([-1, 0])), "n": 2}
    assert rows["sft"]["general_after"]["mean"] == 46.0
    assert rows["sft"]["cpu_min"] == {"mean": 2.25, "std": pytest.approx(statistics.stdev([1.5, 3.0])), "n": 2}
    assert "cpu_min" not in paired(group_runs(runs), "sft")[0]  # a cost, not a result: never paired
    from cl_bench.recording.report import write_report

    summary = write_report(runs, tmp_path / "out")
    assert [f["status"] for f in summary["failed"]] == ["failed"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| " + str(tmp_path / "4") + " | failed | FloatingPointError: non-finite / loss at step 3 |" in md


def test_two_streams_are_never_averaged_together(tmp_path):
    write_result(tmp_path, "x", "sft", 1, [[0, 0], [80, 10], [40, 90]], data_seed=0)
    write_result(tmp_path, "y", "sft", 2, [[0, 0], [70, 10], [50, 70]], data_seed=1)
    rows = aggregate(group_runs(find_runs([tmp_path])))
    assert len(rows) == 2 and all(r["op"]["n"] == 1 for r in rows)


def test_runs_on_different_data_are_kept_apart_and_said_so_and_a_moved_folder_is_not(tmp_path):
    from cl_bench.recording.report import write_report

    def run(name, seed, digest, folder):
        write_result(
            tmp_path / "runs",
            name,
            "sft",
            seed,
            [[0, 0], [80, 10], [40 + seed, 90]],
            config_extra={"tasks": {"_target_": "cl_bench.data.tasks.load_stream", "data_dir": folder}},
            results_extra={"data": {"manifest_sha256": digest, "files": {}}},
        )

    run("a1", 1, "a" * 64, "/data/trace_500")
    run("a2", 2, "a" * 64, "/mnt/other/copy_of_trace_500")  # the same files elsewhere: a repeat
    run("b1", 1, "b" * 64, "/data/trace_5000")
    summary = write_report(find_runs([tmp_path / "runs"]), tmp_path / "out")
    rows = sorted(summary["groups"], key=lambda r: r["stream"])
    assert [(r["stream"].split(";")[0], r["seeds"]) for r in rows] == [
        ("load_stream(data aaaaaaaaaaaa", [1, 2]),
        ("load_stream(data bbbbbbbbbbbb", [1]),
    ]
    note = "load_stream on a, b: runs read 2 different data sets (aaaaaaaaaaaa, bbbbbbbbbbbb); they are kept apart"
    assert summary["different_data"][0].startswith(note)
    assert note in (tmp_path / "out" / "report.md").read_text()


def test_per_example_flips_reach_the_tables_as_a_mean_over_runs(tmp_path):
    from cl_bench.recording.report import write_report

    def flips(forgotten, adjusted):
        return {
            "forgotten": forgotten,
            "gained": 0.1,
            "forgotten_beyond_chance": adjusted,
            "gained_beyond_chance": None,
        }

    for seed, (cls, gen) in enumerate(((0.5, 0.2), (0.3, 0.4)), start=1):
        write_result(
            tmp_path / "runs",
            str(seed),
            "sft",
            seed,
            [[0, 0], [80, 10], [40, 90]],
            results_extra={"example_forgetting": {"a": flips(0.9, cls), "b": flips(gen, None)}},
        )
    summary = write_report(find_runs([tmp_path / "runs"]), tmp_path / "out")
    # per run: the mean over tasks of F beyond chance (a, which has options) and raw F (b), in %
    assert summary["groups"][0]["ex_forgotten"]["mean"] == pytest.approx(
        (100 * (0.5 + 0.2) / 2 + 100 * (0.3 + 0.4) / 2) / 2
    )
    assert summary["groups"][0]["ex_gained"]["mean"] == pytest.approx(10.0)
    assert "ex_forgotten" in (tmp_path / "out" / "report.md").read_text()
    write_report(find_runs([sweep(tmp_path / "old")]), tmp_path / "out2")  # recorded before: no column
    assert "ex_forgotten" not in (tmp_path / "out2" / "report.md").read_text()


def test_a_method_s_differing_settings_make_separate_groups(tmp_path):
    write_result(tmp_path, "x", "fggm", 1, [[0, 0], [80, 10], [40, 90]], extra={"alpha": 0.7, "fisher": "batch"})
    write_result(tmp_path, "y", "fggm", 1, [[0, 0], [70, 10], [50, 70]], extra={"alpha": 0.5, "fisher": "batch"})
    assert sorted(r["method"] for r in aggregate(group_runs(find_runs([tmp_path])))) == [
        "fggm [alpha=0.5]",
        "fggm [alpha=0.7]",
    ]


def test_paired_differences_and_a_deterministic_bootstrap(tmp_path):
    pairs = paired(group_runs(find_runs([sweep(tmp_path)])), "sft", seed=3)
    (row,) = pairs
    assert row["method"] == "fggm" and row["seeds"] == [1, 2]
    assert row["delta_RG"]["diff"] == pytest.approx(statistics.fmean([-1 - -5, 0 - -3]))
    # two pairs: Student's t (t_{0.975,1} = 12.706), not a bootstrap of two values (their min and max)
    half = 12.706 * statistics.stdev([70 - 65, 60 - 60]) / 2**0.5
    assert row["op"]["interval"] == "t" and row["op"]["ci95"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-4)
    diffs = [1.0, 2.0, 4.0, -1.0, 3.0]
    assert bootstrap_interval(diffs, 7) == bootstrap_interval(diffs, 7)
    low, high = bootstrap_interval(diffs, 7)
    assert min(diffs) <= low < statistics.fmean(diffs) < high <= max(diffs)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def test_the_cli_writes_every_output_fast_and_the_html_holds_every_figure(tmp_path):
    out = tmp_path / "report"
    ready()  # the preloaded server's own start is not the report's time
    start = time.perf_counter()
    proc = run_module("runners.report", str(sweep(tmp_path / "runs")), "--out", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 5 + 3  # the report itself in < 5 s; its start in the rest
    assert re.search(r"5 runs, 2 groups, 1 not finished", proc.stdout)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "setting1_cl_metrics.png",
        "setting1_general_ability.png",
        "setting1_score_matrices.png",
        "setting1_task_curves.png",
    ]
    assert sorted(p.name for p in out.glob("*.pdf")) == [name.replace(".png", ".pdf") for name in pngs]
    assert all((out / name.replace(".png", ".pdf")).read_bytes().startswith(b"%PDF") for name in pngs)
    parser = _Images()
    page = (out / "report.html").read_text()
    parser.feed(page)
    assert sorted(i["alt"] for i in parser.images) == pngs
    assert all(i["src"].startswith("data:image/png;base64,") for i in parser.images)
    # a caption under every figure that says what it shows (issue 25.5), not only its file name
    assert page.count("<figcaption><b>Figure ") == 4 and "boxed: each task right after its own training" in page
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("method,stream,order,model,seeds,op_mean,op_std,op_n")


def test_bad_paths_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="no such run or sweep dir"):
        find_runs([tmp_path / "nope"])
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"results.json: not a run's results.json"):
        find_runs([tmp_path])


def test_the_html_renders_in_a_headless_browser(tmp_path):
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium) to render report.html")
    from cl_bench.recording.report import write_report

    write_report(find_runs([sweep(tmp_path / "runs")]), tmp_path / "out")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            (tmp_path / "out" / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1200) and pixels.std() > 0.05  # drawn, not a blank page


def test_continual_metrics_and_curves_reach_the_tables_and_a_figure(tmp_path):
    from cl_bench.recording.comparison import mean_curves
    from cl_bench.recording.report import write_report

    curves = [
        {
            "steps": [2, 4, 6],
            "training": [0, 1, 1],
            "measures": {"a": "loglik", "b": "loglik"},
            "scores": {"a": [-1.0, -3.0, -2.0], "b": [None, -4.0, -1.0]},
        },
        {
            "steps": [2, 4, 6],
            "training": [0, 1, 1],
            "measures": {"a": "loglik", "b": "loglik"},
            "scores": {"a": [-2.0, -5.0, -2.0], "b": [None, -2.0, -1.0]},
        },
    ]
    for seed, (c, wc) in enumerate(zip(curves, (-2.5, -3.0)), start=1):
        run = write_result(tmp_path / "runs", str(seed), "sft", seed, [[0, 0], [80, 10], [40, 90]])
        data = json.loads((run / "results.json").read_text())
        data["continual"] = c
        data["continual_metrics"] = {"avg_min_acc": min(c["scores"]["a"][1:]), "wc_acc": wc, "wf10": 2.0}
        (run / "results.json").write_text(json.dumps(data))
    runs = find_runs([tmp_path / "runs"])
    mean = mean_curves(runs)
    assert mean["scores"] == {"a": [-1.5, -4.0, -2.0], "b": [None, -3.0, -1.0]} and mean["n"] == 2
    (row,) = aggregate(group_runs(runs))
    assert row["avg_min_acc"] == {"mean": -4.0, "std": pytest.approx(2**0.5), "n": 2}
    # recomputed from the curves, not read from the stored values (a run recorded under an earlier
    # rule is compared under today's): WC-ACC (1/2)(-1) + (1/2)(-3) and (1/2)(-1) + (1/2)(-5); WF10
    # averaged over both tasks, (2 + 0) / 2 and (3 + 0) / 2, not the stored 2.0
    assert row["wc_acc"]["mean"] == pytest.approx(-2.5) and row["wf10"]["mean"] == pytest.approx(1.25)
    write_report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| avg_min_acc | wc_acc | wf10 |" in md and "-2.5 ± 0.7 (n=2)" in md and "1.2 ± 0.4 (n=2)" in md
    assert (tmp_path / "out" / "setting1_continual.png").is_file()


def test_runs_without_continual_evaluation_show_no_continual_columns(tmp_path):
    from cl_bench.recording.report import write_report

    write_report(find_runs([sweep(tmp_path / "runs")]), tmp_path / "out")
    assert "avg_min_acc" not in (tmp_path / "out" / "report.md").read_text()


def test_several_baselines_give_one_paired_table_each(tmp_path):
    from cl_bench.recording.report import write_report

    runs = find_runs([sweep(tmp_path / "runs")])
    summary = write_report(runs, tmp_path / "out", baseline=["sft", "fggm"], seed=3)
    assert [(p["method"], p["baseline"]) for p in summary["paired"]] == [("fggm", "sft"), ("sft", "fggm")]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Paired with sft over" in md and "Paired with fggm over" in md
    assert summary["paired"][1]["op"]["diff"] == -summary["paired"][0]["op"]["diff"]


def test_lora_runs_are_never_averaged_with_full_fine_tuning(tmp_path):
    write_result(tmp_path, "full", "sft", 1, [[0, 0], [80, 10], [40, 90]])
    lora = write_result(tmp_path, "lora", "sft", 2, [[0, 0], [70, 10], [50, 70]])
    data = json.loads((lora / "results.json").read_text())
    data["config"]["model"]["lora"] = {"enabled": True, "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (lora / "results.json").write_text(json.dumps(data))
    rows = aggregate(group_runs(find_runs([tmp_path])))
    assert sorted(r["model"] for r in rows) == [
        "tiny random Llama",
        "tiny random Llama+lora(r=8, alpha=16, q_proj,v_proj)",
    ]


def test_a_score_matrix_has_its_diagonal_boxed_and_its_stages_named_by_task():
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from cl_bench.recording.figures import draw_score_matrix, stage_labels

    R = [[0, 0, 0], [80, 10, 5], [40, 90, 5], [30, 60, 70]]
    assert stage_labels(["a", "b", "c"], 4) == ["base", "after a", "after b", "after c"]
    assert stage_labels(["a", "b", "c"], 2, joint=True) == ["base", "after joint"]
    fig, ax = plt.subplots()
    draw_score_matrix(ax, R, ["a", "b", "c"], stage_labels(["a", "b", "c"], 4), "sft")
    boxes = [p.get_xy() for p in ax.patches if isinstance(p, Rectangle)]
    assert boxes == [(-0.5, 0.5), (0.5, 1.5), (1.5, 2.5)]  # cell (row after t, column t), t = a, b, c
    assert [t.get_text() for t in ax.get_yticklabels()] == ["base", "after a", "after b", "after c"]
    ax.clear()
    draw_score_matrix(ax, R[:2], ["a", "b", "c"], stage_labels(["a", "b", "c"], 2, True), "joint", joint=True)
    assert not [p for p in ax.patches if isinstance(p, Rectangle)]
    plt.close(fig)


def test_many_panels_wrap_into_rows_of_four():
    """7 methods: a 2 x 4 grid with 7 panels shown in reading order and the 8th hidden."""
    import matplotlib.pyplot as plt

    from cl_bench.recording.figures import _grid

    fig, axes = _grid(7, 3, 3)
    grid = fig.axes
    assert len(grid) == 8 and len(axes) == 7 and axes == grid[:7]
    assert [ax.get_visible() for ax in grid] == [True] * 7 + [False]
    assert [ax.get_subplotspec().rowspan.start for ax in axes] == [0] * 4 + [1] * 3
    assert tuple(fig.get_size_inches()) == (13.0, 6.0)
    plt.close(fig)
    fig, axes = _grid(2, 3, 3)
    assert len(fig.axes) == 2 and tuple(fig.get_size_inches()) == (7.0, 3.0)
    plt.close(fig)


def test_only_true_repeats_are_averaged_and_every_row_names_its_runs(tmp_path):
    """Issue 25.1: runs that differ in the learning rate (or any result setting) are separate rows,
    whatever their seeds; runs that differ only in seed, paths, names or loggers are one row."""
    from cl_bench.recording.report import write_report

    write_result(tmp_path, "a", "sft", 1, [[0, 0], [80, 10], [40, 90]])
    write_result(tmp_path, "b", "sft", 2, [[0, 0], [70, 10], [50, 70]], config_extra={"logger": {"csv": {"name": "x"}}})
    # a seed that follows the run's (model.seed: ${seed}) is part of the repeat, not a setting (it split
    # every tiny-model sweep into one row per seed); a fixed one that differs is a setting
    write_result(
        tmp_path,
        "e",
        "sft",
        5,
        [[0, 0], [70, 10], [50, 70]],
        config_extra={"model": {"_target_": "cl_bench.models.tiny_llama", "seed": 5}},
    )
    write_result(
        tmp_path,
        "f",
        "sft",
        6,
        [[0, 0], [70, 10], [50, 70]],
        config_extra={"model": {"_target_": "cl_bench.models.tiny_llama", "seed": 1}},
    )
    write_result(tmp_path, "c", "sft", 3, [[0, 0], [60, 10], [20, 50]], config_extra={"optimizer": {"lr": 1e-3}})
    write_result(tmp_path, "d", "sft", 4, [[0, 0], [60, 10], [20, 50]], config_extra={"train": {"batch_size": 8}})
    runs = find_runs([tmp_path])
    rows = {r["method"]: r for r in aggregate(group_runs(runs))}
    assert set(rows) == {
        "sft [model.seed=None, optimizer.lr=0.0001, train.batch_size=4]",
        "sft [model.seed=None, optimizer.lr=0.001, train.batch_size=4]",
        "sft [model.seed=None, optimizer.lr=0.0001, train.batch_size=8]",
        "sft [model.seed=1, optimizer.lr=0.0001, train.batch_size=4]",
    }
    repeats = rows["sft [model.seed=None, optimizer.lr=0.0001, train.batch_size=4]"]
    assert repeats["seeds"] == [1, 2, 5] and repeats["runs"] == [str(tmp_path / n) for n in "abe"]
    summary = write_report(runs, tmp_path / "out")
    assert summary["separating_keys"] == {"sft": ["model.seed", "optimizer.lr", "train.batch_size"]}
    page = (tmp_path / "out" / "report.html").read_text()
    assert f"{tmp_path / 'a'} {tmp_path / 'b'}" in page and str(tmp_path / "d") in page


def test_the_same_seed_twice_in_one_group_is_refused_by_name(tmp_path):
    write_result(tmp_path, "a", "sft", 1, [[0, 0], [80, 10], [40, 90]])
    write_result(tmp_path, "b", "sft", 1, [[0, 0], [70, 10], [50, 70]], config_extra={"run_name": "again"})
    with pytest.raises(
        ConfigError, match=f"{tmp_path / 'a'} and {tmp_path / 'b'}: two runs of the same settings and seed 1"
    ):
        group_runs(find_runs([tmp_path]))


def test_seeds_only_one_side_ran_are_named_not_silently_dropped(tmp_path):
    from cl_bench.recording.report import write_report

    sweep(tmp_path / "runs")
    write_result(tmp_path / "runs", "5", "fggm", 3, [[0, 0], [70, 10], [50, 70]])
    runs = find_runs([tmp_path / "runs"])
    (pair,) = paired(group_runs(runs), "sft")
    assert pair["seeds"] == [1, 2] and pair["unpaired_seeds"] == {"fggm": [3], "sft": []}
    write_report(runs, tmp_path / "out")
    assert (
        "Not paired, so not in the differences above: fggm ran seeds 3 that the other did not"
        in (tmp_path / "out" / "report.md").read_text()
    )


def test_a_pipe_in_a_setting_does_not_shift_the_columns(tmp_path):
    from cl_bench.recording.report import write_report

    write_result(tmp_path, "a", "fggm", 1, [[0, 0], [80, 10], [40, 90]], extra={"note": "a|b"})
    write_result(tmp_path, "b", "fggm", 1, [[0, 0], [70, 10], [50, 70]], extra={"note": "c"})
    write_report(find_runs([tmp_path]), tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    for table in re.findall(r"<table>(.*?)</table>", page):
        head, *body = re.findall(r"<tr>(.*?)</tr>", table)
        assert body and all(row.count("<td>") == head.count("<th>") for row in body), table
    assert "fggm [note=a|b]</td>" in page


def test_learning_paradigms_name_their_groups_and_the_kl_to_base_and_new_task_score_reach_the_tables(tmp_path):
    """SFT's runs keep the method's name; GRPO's are "grpo" (plain) or "grpo+ewc"; new_task is the
    mean of R[t+1][t]; kl_new the mean of the KL matrix's same cells, shown only where measured."""
    from cl_bench.recording.report import write_report

    R = [[0, 0], [80, 10], [40, 90]]
    kl = [[0.0, 0.0], [0.5, 0.1], [0.7, 0.3]]
    grpo = {"learning": {"_target_": "cl_bench.on_policy.grpo.GRPO"}}
    for seed in (1, 2):
        write_result(tmp_path / "runs", f"s{seed}", "sft", seed, R, results_extra={"kl_to_base": kl})
        for method in ("sft", "ewc"):
            write_result(
                tmp_path / "runs",
                f"g{method}{seed}",
                method,
                seed,
                [[0, 0], [20, 10], [20, 30]],
                config_extra=grpo,
                results_extra={"learning": {"paradigm": "grpo"}, "kl_to_base": [[0, 0], [0.1, 0], [0.1, 0.2]]},
            )
    summary = write_report(find_runs([tmp_path / "runs"]), tmp_path / "out", baseline="sft")
    rows = {g["method"]: g for g in summary["groups"]}
    assert set(rows) == {"sft", "grpo", "grpo+ewc"}
    assert rows["sft"]["new_task"]["mean"] == pytest.approx((80 + 90) / 2)
    assert rows["grpo"]["new_task"]["mean"] == pytest.approx((20 + 30) / 2)
    assert rows["sft"]["kl_new"]["mean"] == pytest.approx((0.5 + 0.3) / 2)
    assert rows["grpo+ewc"]["kl_new"]["mean"] == pytest.approx((0.1 + 0.2) / 2)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| grpo+ewc | 1,2 |" in md and "kl_new" in md
    write_report(find_runs([sweep(tmp_path / "old")]), tmp_path / "out2")  # no KL measured: no column
    assert "kl_new" not in (tmp_path / "out2" / "report.md").read_text()
