"""The study end to end on the synthetic set: the sweep's chain, its state file, a crash and the resume, a rerun
that does nothing, the report's numbers against the W&B runs, and the benchmark command."""

import dataclasses
import json
import re
import warnings
import zlib

import matplotlib.image
import numpy as np
import pytest
from wandb.proto import wandb_internal_pb2

import tea_lightning.cli
import tea_lightning.study.report
import tea_lightning.study.sweep
from tea_lightning.errors import ConfigError
from tea_lightning.study.benchmark import benchmark_main
from tea_lightning.study.figures import pareto_front
from tea_lightning.study.report import report_main
from tea_lightning.study.sweep import BestMetrics, STATE_FILE, Study, parse, plan, sweep_main
from tea_lightning.study.wandb_runs import BLOCK, CHUNK_HEADER, FILE_HEADER, FIRST, FULL, LAST, MIDDLE, _records, \
    offline_runs
from tests.conftest import FAST

EXTRA = [a for a in FAST if a not in ("--trainer.logger", "CSVLogger")]  # the sweep logs to W&B (offline)
STEPS = ["yolov5n/baseline", "yolov5n/eval", "yolov5n/prune-0.3", "yolov5n/finetune-0.3", "yolov5n/eval-0.3"]


def sweep_args(data, out, **changes):
    options = {"--models": "yolov5n", "--ratios": "0.3", "--img": "128", "--batch": "4", "--epochs": "1",
               "--finetune-epochs": "2", "--latency-runs": "2", "--study": "t", **changes}
    return ["--data", str(data), "--out", str(out), *[v for kv in options.items() for v in kv], "--", *EXTRA]


def counted_sweep(monkeypatch, argv) -> list[list[str]]:
    """Run the sweep and return the argument lists of the tea-lightning runs it started."""
    calls, real = [], tea_lightning.cli.cli_main
    monkeypatch.setattr(tea_lightning.cli, "cli_main", lambda args: calls.append(args) or real(args))
    sweep_main(argv)
    return calls


@pytest.fixture(scope="module")
def study(synthetic_yaml, tmp_path_factory):
    """Run the sweep, crashing in the fine-tune's second epoch; run it again (it resumes); return the folder,
    the runs of the second sweep and those of a third, and the second's warnings."""
    out = tmp_path_factory.mktemp("study") / "s"

    def crash_in_epoch_1(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setattr(BestMetrics, "on_train_epoch_start", crash_in_epoch_1, raising=False)
        with pytest.raises(RuntimeError, match="simulated crash"):
            sweep_main(sweep_args(synthetic_yaml, out))
        crashed_state = json.loads((out / STATE_FILE).read_text())
        mp.undo()
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            resumed = counted_sweep(mp, sweep_args(synthetic_yaml, out))
        again = counted_sweep(mp, sweep_args(synthetic_yaml, out))
    return out, crashed_state, resumed, again, [str(w.message) for w in warned]


def run_of(out, step):
    """Return the W&B run of a step, all its offline sessions merged."""
    state = json.loads((out / STATE_FILE).read_text())
    (run,) = [r for r in offline_runs([out]) if r.id == state["steps"][step]["run_id"]]
    return run


def test_the_crash_keeps_finished_steps_and_the_rerun_resumes_the_fit(study):
    out, crashed, resumed, _, warned = study
    assert list(crashed["steps"]) == STEPS[:3]
    assert [args[0] for args in resumed] == ["fit", "validate"]  # only the unfinished steps
    fit = resumed[0]
    last = fit[fit.index("--ckpt_path") + 1]
    assert last.endswith("checkpoints/last.ckpt") and "finetune-0.3" in last
    # the resumed fit wrote on in the same W&B run: two offline sessions of one id, epoch 0 only in the first
    state = json.loads((out / STATE_FILE).read_text())
    run_id = state["steps"]["yolov5n/finetune-0.3"]["run_id"]
    sessions = sorted((out / "yolov5n" / "finetune-0.3" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) == 2
    epochs = [{row["epoch"] for row in run.history if "train/box_loss" in row}
              for s in sessions for run in offline_runs([s])]
    assert epochs == [{0}, {1}]
    # it writes on in its own checkpoint folder on purpose: Lightning's warning that the folder is not empty is not
    # shown (a fit that is not a resume still gets it)
    assert not [message for message in warned if "Checkpoint directory" in message]


def test_the_state_file_records_every_step_and_a_rerun_does_no_work(study):
    out, _, _, again, _ = study
    state = json.loads((out / STATE_FILE).read_text())
    assert list(state["steps"]) == STEPS and again == []
    steps = state["steps"]
    base, pruned = steps["yolov5n/baseline"]["results"], steps["yolov5n/prune-0.3"]["results"]
    assert pruned["params"] < 0.6 * base["params"] and pruned["GFLOPs"] < 0.6 * base["GFLOPs"]
    # the fine-tune's best checkpoint, re-validated by the eval step, gives the metrics the fit kept as best
    tuned, evaluated = steps["yolov5n/finetune-0.3"]["results"], steps["yolov5n/eval-0.3"]["results"]
    assert evaluated["fitness"] == pytest.approx(tuned["fitness"], abs=1e-6)
    assert steps["yolov5n/eval-0.3"]["checkpoint"] == steps["yolov5n/finetune-0.3"]["checkpoint"]


def test_every_run_is_in_wandb_with_group_job_type_config_and_final_summary(study):
    out, *_ = study
    state = json.loads((out / STATE_FILE).read_text())
    for step, entry in state["steps"].items():
        run = run_of(out, step)
        assert run.group == "t" and run.job_type == entry["job_type"] and entry["job_type"] in run.tags
        assert run.config["model"] == "yolov5n" and run.config["pruning_ratio"] == entry["ratio"]
        assert run.config["importance"] == "l2" and run.config["seed"] == 0
        assert run.config["params"] == entry["results"]["params"]
        assert run.config["GFLOPs"] == entry["results"]["GFLOPs"]
        for key, value in entry["results"].items():
            if value is not None:
                assert run.summary[f"final/{key}"] == value
        assert run.summary["final/latency_pytorch_ms"] > 0 and run.summary["final/latency_onnxruntime_ms"] > 0


def test_report_table_equals_the_wandb_summaries_and_figures_are_written(study, tmp_path, monkeypatch):
    out, *_ = study
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    report_main([str(out), "--out", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    table = md.split("## Every run")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]
    assert len(rows) == len(STEPS)
    for row in rows:
        summary = next(r for r in offline_runs([out]) if r.id == row["W&B run"]).summary
        assert row["mAP50-95"] == f"{summary['final/mAP50-95']:.4f}" and row["F1"] == f"{summary['final/f1']:.3f}"
        assert row["params"] == f"{summary['final/params']:,}" and row["GFLOPs"] == f"{summary['final/GFLOPs']:.3f}"
        assert row["PyTorch ms (b1)"] == f"{summary['final/latency_pytorch_ms']:.1f}"
    html = (tmp_path / "report.html").read_text()
    for name in ("curves_yolov5n.png", "losses_yolov5n.png", "tradeoff.png"):
        assert f"]({name})" in md and f'src="{name}"' in html
        height, width, _ = matplotlib.image.imread(tmp_path / name).shape
        assert height > 400 and width > 700


def test_a_report_of_two_studies_keeps_each_studys_rows_apart(study, tmp_path, monkeypatch):
    out, *_ = study
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    runs = offline_runs([out])
    other = [dataclasses.replace(run, id=f"{run.id}u", group="u") for run in runs]  # a second study's runs
    monkeypatch.setattr(tea_lightning.study.report, "offline_runs", lambda folders: runs + other)
    report_main([str(out), "--out", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    comparison = md.split("## Before and after fine-tuning")[1].split("## Every run")[0]
    assert comparison.count("| yolov5n (t) | baseline |") == comparison.count("| yolov5n (u) | baseline |") == 1
    assert comparison.count("| yolov5n (t) | 0.3 |") == comparison.count("| yolov5n (u) | 0.3 |") == 1
    assert "# Pruning study: t, u" in md
    for name in ("curves_yolov5n_t.png", "losses_yolov5n_t.png", "curves_yolov5n_u.png", "losses_yolov5n_u.png"):
        assert f"]({name})" in md and (tmp_path / name).is_file()


def test_report_marks_latencies_timed_on_a_busy_cpu(study, tmp_path, monkeypatch):
    out, *_ = study
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    state = json.loads((out / STATE_FILE).read_text())
    tuned = state["steps"]["yolov5n/eval-0.3"]["run_id"]
    runs = offline_runs([out])
    assert all(0 <= run.summary["final/latency_cpu_busy"] <= 1 for run in runs)  # every step records it
    # one run timed on a busy CPU, the others on a quiet one (whatever this machine was doing during the sweep)
    runs = [dataclasses.replace(run, summary={**run.summary, "final/latency_cpu_busy": 0.8 if run.id == tuned else 0})
            for run in runs]
    monkeypatch.setattr(tea_lightning.study.report, "offline_runs", lambda folders: runs)
    report_main([str(out), "--out", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    comparison = md.split("## Before and after fine-tuning")[1].split("## Every run")[0]
    (tuned_row,) = [line for line in comparison.splitlines() if line.startswith("| yolov5n | 0.3 |")]
    (base_row,) = [line for line in comparison.splitlines() if line.startswith("| yolov5n | baseline |")]
    assert tuned_row.count(" *") == 2 and " *" not in base_row  # PyTorch and ONNX Runtime cells of that run
    assert "Latencies marked * (1 run(s)) were timed while other processes kept more than 25% of the CPUs busy" in md
    assert "| 80% |" in md.split("## Every run")[1]


def test_report_names_unfinished_steps_and_what_finishes_them(study, tmp_path, monkeypatch):
    out, *_ = study
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    state = json.loads((out / STATE_FILE).read_text())
    interrupted = state["steps"]["yolov5n/finetune-0.3"]["run_id"]
    runs = [dataclasses.replace(run, summary={k: v for k, v in run.summary.items() if not k.startswith("final/")})
            if run.id == interrupted else run for run in offline_runs([out])]
    # a finished step's run left behind by an interrupted start, under another id, is not an unfinished step
    baseline = next(run for run in runs if run.config.get("step") == "baseline")
    runs.append(dataclasses.replace(baseline, id="orphan", summary={}))
    monkeypatch.setattr(tea_lightning.study.report, "offline_runs", lambda folders: runs)
    report_main([str(out), "--out", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    assert "Unfinished steps (a W&B run without final results, e.g. an interrupted fit; their cells show -): " \
           "yolov5n/finetune-0.3. Run the same `tea-lightning sweep` command again to finish them." in md
    monkeypatch.undo()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no runs to compare found in .*empty: `report` compares the steps of a "
                                          "`tea-lightning sweep` study .* and fits made by hand .* give their "
                                          "--trainer.default_root_dir.* `tea-lightning validate --ckpt_path CKPT`"):
        report_main([str(tmp_path / "empty")])


def test_a_sweep_interrupted_in_its_first_fit_resumes_that_fit(synthetic_yaml, tmp_path, monkeypatch):
    # The run folders carry the study's token: it must be on disk before the first step, or the rerun names a new
    # folder and starts the baseline again from epoch 0.
    def interrupted(study, step):
        last = study.run_folder(step) / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        last.write_bytes(b"")  # what an interrupted fit leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(tea_lightning.study.sweep, "run_step", interrupted)
    argv = sweep_args(synthetic_yaml, tmp_path / "s")
    with pytest.raises(KeyboardInterrupt):
        sweep_main(argv)
    again = Study(parse(argv))
    baseline = plan(["yolov5n"], [0.3])[0]
    args = again.command(baseline)
    assert args[0] == "fit" and args[args.index("--ckpt_path") + 1] == \
        str(again.run_folder(baseline) / "checkpoints" / "last.ckpt")


def test_pareto_front_keeps_only_points_nothing_beats():
    costs = np.array([1.0, 2.0, 2.0, 3.0, 4.0])
    scores = np.array([0.1, 0.3, 0.2, 0.25, 0.5])
    assert pareto_front(costs, scores).tolist() == [0, 1, 4]


def leveldb_log(payloads: list[bytes]) -> bytes:
    """Frame payloads as wandb's transaction log does (LevelDB log format): 32 KiB blocks, chunks split across
    blocks, block tails under a header's size zero-padded."""
    out = bytearray(FILE_HEADER.pack(b":W&B", 0xBEE1, 0))
    for data in payloads:
        first = True
        while first or data:
            left = BLOCK - len(out) % BLOCK
            if left < CHUNK_HEADER.size:
                out += bytes(left)
                continue
            chunk, data = data[:left - CHUNK_HEADER.size], data[left - CHUNK_HEADER.size:]
            kind = (FULL if not data else FIRST) if first else (LAST if not data else MIDDLE)
            out += CHUNK_HEADER.pack(zlib.crc32(chunk, zlib.crc32(bytes([kind]))), len(chunk), kind) + chunk
            first = False
    return bytes(out)


def test_transaction_log_reader_joins_chunks_across_blocks_and_stops_at_a_torn_end(tmp_path):
    records = []
    # the second record spans three blocks; the third ends 3 bytes before a block end, which is then zero padding
    for i, size in enumerate([100, 70000, 28108, 50]):
        record = wandb_internal_pb2.Record()
        item = record.history.item.add()
        item.key, item.value_json = f"k{i}", json.dumps("x" * size)
        records.append(record)
    log = tmp_path / "run-x.wandb"
    log.write_bytes(leveldb_log([r.SerializeToString() for r in records]))
    assert [r.history.item[0].value_json for r in _records(log)] == [r.history.item[0].value_json for r in records]
    log.write_bytes(log.read_bytes()[:-10])  # a run killed while writing its last record
    assert len(list(_records(log))) == len(records) - 1


def test_benchmark_prints_batch_1_and_n_latency_of_a_pruned_checkpoint(study, tmp_path, capsys):
    out, *_ = study
    checkpoint = json.loads((out / STATE_FILE).read_text())["steps"]["yolov5n/finetune-0.3"]["checkpoint"]
    benchmark_main([checkpoint, "--img", "64", "--batch", "1", "2", "--runs", "3", "--warmup", "1",
                    "--onnx", str(tmp_path / "m.onnx")])
    printed = capsys.readouterr().out
    assert "875,383 parameters" in printed and (tmp_path / "m.onnx").is_file()
    found = re.findall(r"\| (pytorch|onnxruntime) \| (\d) \| ([\d.]+) \|", printed)
    assert {(b, n) for b, n, _ in found} == {("pytorch", "1"), ("pytorch", "2"), ("onnxruntime", "1"),
                                              ("onnxruntime", "2")}
    assert all(float(ms) > 0 for *_, ms in found)


def test_benchmark_refuses_an_onnx_folder_before_any_timing(tmp_path):
    with pytest.raises(ConfigError, match=f"--onnx {tmp_path} is a folder: give the path of the .onnx file to write, "
                                          f"e.g. {tmp_path / 'never_read.onnx'}"):
        benchmark_main([str(tmp_path / "never_read.ckpt"), "--onnx", str(tmp_path)])  # checked before the file is read


def test_benchmark_times_a_yolov5_pt_that_export_pt_wrote(study, tmp_path, capsys):
    out, *_ = study
    checkpoint = json.loads((out / STATE_FILE).read_text())["steps"]["yolov5n/finetune-0.3"]["checkpoint"]
    with pytest.raises(ConfigError, match=f"{tmp_path} is a folder: give the path of the .pt file to write"):
        tea_lightning.cli.export_pt([checkpoint, str(tmp_path)])
    tea_lightning.cli.export_pt([checkpoint, str(tmp_path / "pruned.pt")])
    assert "875,383 parameters, classes ['bud', 'leaf'], float16 weights" in capsys.readouterr().out
    benchmark_main([str(tmp_path / "pruned.pt"), "--batch", "1", "--runs", "2", "--warmup", "0"])
    printed = capsys.readouterr().out
    assert "pruned.pt: 875,383 parameters" in printed and "GFLOPs at 640x640" in printed  # a .pt records no size
    assert re.search(r"\| onnxruntime \| 1 \| [\d.]+ \|", printed)


@pytest.mark.parametrize("change, message", [
    ({"--ratios": "1.5"}, "--ratios must lie between 0 and 1"),
    ({"--models": "yolov5q"}, "no configs/<model>.yaml"),
    ({"--img": "100"}, "multiple of 32"),
    ({"--epochs": "0"}, "--epochs takes one number of epochs"),
    ({"--epochs": "yolov5s=3"}, "--epochs takes one number .* of --models \\(yolov5n\\)"),
    ({"--finetune-epochs": "yolov5n=x"}, "--finetune-epochs takes one number"),
    ({"--distill": "-1"}, "--distill must be >= 0"),
])
def test_bad_options_are_named(synthetic_yaml, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        sweep_main(sweep_args(synthetic_yaml, tmp_path, **change))


def with_values(args: list[str], option: str, *values: str) -> list[str]:
    """Return `args` (of sweep_args: one value per option) with `option`'s value replaced by `values`."""
    at = args.index(option)
    return [*args[:at + 1], *values, *args[at + 2:]]


def test_epochs_can_differ_per_model_and_a_model_may_join_with_its_own(study, synthetic_yaml):
    out, *_ = study  # yolov5n finished with --epochs 1
    both = with_values(sweep_args(synthetic_yaml, out), "--models", "yolov5n", "yolov5s")
    args = with_values(both, "--epochs", "1", "yolov5s=2")
    joined = Study(parse(args))
    max_epochs = {step.model: command[command.index("--trainer.max_epochs") + 1]
                  for step in plan(["yolov5n", "yolov5s"], [0.3]) if step.job == "baseline"
                  for command in [joined.command(step)]}
    assert max_epochs == {"yolov5n": "1", "yolov5s": "2"}
    with pytest.raises(ConfigError, match="--epochs was 1, now 1 yolov5n=3"):
        Study(parse(with_values(both, "--epochs", "1", "yolov5n=3")))
    with pytest.raises(ConfigError, match="--epochs gives no number for yolov5s"):
        parse(with_values(both, "--epochs", "yolov5n=1"))


def test_a_study_folder_refuses_other_options(study, synthetic_yaml):
    out, *_ = study
    with pytest.raises(ConfigError, match="--epochs was 1, now 3"):
        sweep_main(sweep_args(synthetic_yaml, out, **{"--epochs": "3"}))
    with pytest.raises(ConfigError, match="--finetune-epochs was 2, now yolov5n=3"):
        sweep_main(sweep_args(synthetic_yaml, out, **{"--finetune-epochs": "yolov5n=3"}))
    with pytest.raises(ConfigError, match="--weights takes MODEL=PATH"):
        sweep_main(sweep_args(synthetic_yaml, out, **{"--weights": "yolov5s=x.pt"}))


def test_distill_makes_the_finetune_step_learn_from_the_baseline_and_older_studies_continue(study, synthetic_yaml,
                                                                                          tmp_path):
    out, *_ = study
    baseline = json.loads((out / STATE_FILE).read_text())["steps"]["yolov5n/baseline"]["checkpoint"]
    args = sweep_args(synthetic_yaml, tmp_path / "d", **{"--baseline": f"yolov5n={baseline}", "--distill": "2"})
    commands = {step.name: Study(parse(args)).command(step) for step in plan(["yolov5n"], [0.3])
                if step.job in ("prune", "finetune")}
    finetune = commands["finetune-0.3"]
    assert finetune[finetune.index("--model.teacher") + 1] == baseline
    assert finetune[finetune.index("--model.distill_weight") + 1] == "2.0"
    assert not any("--model.teacher" in command for name, command in commands.items() if name != "finetune-0.3")
    # a study from before --distill existed ran without it, and continues without it
    state = json.loads((out / STATE_FILE).read_text())
    del state["options"]["distill"]
    older = tmp_path / "older"
    older.mkdir()
    (older / STATE_FILE).write_text(json.dumps(state))
    assert Study(parse(sweep_args(synthetic_yaml, older))).state["steps"] == state["steps"]
    with pytest.raises(ConfigError, match="--distill was 0.0, now 1.0"):
        Study(parse(sweep_args(synthetic_yaml, older, **{"--distill": "1"})))
