"""`tea-lightning report`: the pruning study's runs (offline W&B run folders, and the W&B API when a key is set) and
single fit runs made by hand (their run folders) as one folder: report.md, report.html, a table of every run, the
before/after fine-tuning comparison, overlaid curves, loss curves and the accuracy-cost trade-off with its Pareto
front."""

from __future__ import annotations

import argparse
import datetime
import html
import re
from pathlib import Path

import numpy as np

from tea_lightning.errors import ConfigError
from tea_lightning.model.detector import LOSS_NAMES
from tea_lightning.report.latency import BUSY_CPU_SHARE
from tea_lightning.study import figures
from tea_lightning.study.fit_runs import BEST, fit_runs
from tea_lightning.study.wandb_runs import RunData, api_available, offline_runs, online_runs

JOB_ORDER = {"baseline": 0, "prune": 1, "finetune": 2, "eval": 3}  # the chain's order
# (column title, row key, format); every value comes unchanged from a run's W&B summary ("final/<key>").
COLUMNS = [("model", "model", "{}"), ("step", "step", "{}"), ("job", "job", "{}"), ("ratio", "ratio", "{:g}"),
           ("params", "params", "{:,}"), ("GFLOPs", "GFLOPs", "{:.3f}"),
           ("PyTorch ms (b1)", "latency_pytorch_ms", "{:.1f}"), ("ORT ms (b1)", "latency_onnxruntime_ms", "{:.1f}"),
           ("CPU busy", "latency_cpu_busy", "{:.0%}"),
           ("ckpt MB", "ckpt_MB", "{:.1f}"), ("ONNX MB", "onnx_MB", "{:.1f}"), ("mAP50", "mAP50", "{:.4f}"),
           ("mAP50-95", "mAP50-95", "{:.4f}"), ("P", "precision", "{:.3f}"), ("R", "recall", "{:.3f}"),
           ("F1", "f1", "{:.3f}"), ("W&B run", "run", "{}")]


def rows_of(runs: list[RunData]) -> list[dict]:
    """Return one row per run with `final/` results (sweep steps, and fit run folders: fit_runs.py), ordered by
    model, ratio and step. When the runs come from more than one study, each model is named with its study
    ("yolov5n (study-a)"; fits made by hand: "yolov5n (fits)"), so that one study's baseline is not compared with
    another's pruned models."""
    finished = [(run, {k[len("final/"):]: v for k, v in run.summary.items() if k.startswith("final/")})
                for run in runs]
    finished = [(run, final) for run, final in finished if "mAP50" in final]
    several_studies = len({run.group for run, _ in finished}) > 1
    rows = []
    for run, final in finished:
        model = run.config.get("model", "?")
        if several_studies:
            model = f"{model} ({run.group or ('fits' if run.job_type == 'fit' else 'no study')})"
        rows.append({**final, "run": run.id, "job": run.job_type, "model": model,
                     "step": run.config.get("step", run.name), "ratio": float(run.config.get("pruning_ratio", 0)),
                     "data": run})
    return sorted(rows, key=lambda r: (r["model"], r["ratio"], JOB_ORDER.get(r["job"], 9), r["step"]))


def kind(row: dict) -> str | None:
    """Return what model a row measures for the comparison, or None for a sweep's fits (their eval rows stand for
    them); a fit made by hand stands for itself."""
    if row["job"] == "prune":
        return "pruned, no fine-tuning"
    if row["job"] in ("eval", "fit"):
        return "pruned + fine-tuned" if row["ratio"] else "baseline"
    return None


def _ratio(row: dict) -> str:
    return f" {row['ratio']:g}" if row["ratio"] else ""


def describe(row: dict) -> str:
    """Return a legend label: which model the row is and how it was made (and, for a fit made by hand, which run:
    several may share a ratio)."""
    made = "baseline" if not row["ratio"] else f"pruned{_ratio(row)}" + {
        "prune": ", no fine-tuning", "finetune": ", fine-tuning"}.get(row["job"], " + fine-tuned")
    return f"{made} ({row['step']})" if row["job"] == "fit" else made


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _delta(value, base) -> str:
    return "" if value is None or not base else f" ({value / base - 1:+.0%})"


def _timed_on_a_busy_cpu(row: dict) -> bool:
    return (row.get("latency_cpu_busy") or 0) > BUSY_CPU_SHARE


def _latency(row: dict, key: str, base: dict) -> str:
    """Return a latency cell: the figure, its change against the baseline, and * when timed on a busy CPU."""
    return _cell(row.get(key), "{:.1f}") + _delta(row.get(key), base.get(key)) \
        + (" *" if _timed_on_a_busy_cpu(row) else "")


def comparison(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Return the before/after fine-tuning table: per model and ratio, cost (change against the baseline) and
    mAP right after pruning and after fine-tuning; a line per run where several share a ratio (fits by hand)."""
    header = ["model", "ratio", "params", "GFLOPs", "PyTorch ms (b1)", "ORT ms (b1)", "mAP50 / mAP50-95 before "
              "fine-tuning", "after fine-tuning", "F1 after", "run"]
    table = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        b = next((r for r in mine if kind(r) == "baseline"), {})
        for ratio in sorted({r["ratio"] for r in mine}):
            before = next((r for r in mine if r["ratio"] == ratio and kind(r) == "pruned, no fine-tuning"), None)
            afters = [r for r in mine if r["ratio"] == ratio and kind(r) in ("baseline", "pruned + fine-tuned")]
            for after in afters or ([None] if before else []):
                shown = after or before
                table.append([model, "baseline" if not ratio else f"{ratio:g}",
                              f"{shown['params']:,}{_delta(shown['params'], b.get('params'))}",
                              f"{shown['GFLOPs']:.3f}{_delta(shown['GFLOPs'], b.get('GFLOPs'))}",
                              _latency(shown, "latency_pytorch_ms", b), _latency(shown, "latency_onnxruntime_ms", b),
                              f"{before['mAP50']:.4f} / {before['mAP50-95']:.4f}" if before else "-",
                              f"{after['mAP50']:.4f} / {after['mAP50-95']:.4f}" if after else "-",
                              _cell(after and after["f1"], "{:.3f}"), str(shown["step"])])
    return header, table


def _file_name(model: str) -> str:
    """Return `model` ("yolov5n", or "yolov5n (study-a)" when the report has several studies) fit for a file name."""
    return re.sub(r"[^\w.-]+", "_", model).strip("_")


def _epochs(row: dict) -> int:
    return int(figures.per_epoch(row["data"].history, "train/box_loss")[0].max(initial=-1)) + 1


def _first_epoch(row: dict, fits: list[dict]) -> int:
    """Return the x at which a fit's losses are drawn from: after the epochs of the fit it continues (a sweep's
    fine-tuning after its baseline; a fit by hand started from another fit's best.ckpt), else 0."""
    if row["job"] == "finetune":
        return next((_epochs(r) for r in fits if r["job"] == "baseline"), 0)
    weights = row["data"].config.get("weights") if row["job"] == "fit" else None
    if weights:
        started_from = Path(weights).expanduser().resolve()
        for r in fits:
            if r is not row and r["job"] == "fit" and (Path(r["data"].source) / BEST).resolve() == started_from:
                return _first_epoch(r, fits) + _epochs(r)
    return 0


def write_figures(rows: list[dict], out: Path) -> dict[str, list[Path]]:
    """Write the per-model curve and loss figures and the trade-off figure; return their paths by section."""
    written: dict[str, list[Path]] = {"curves": [], "losses": [], "tradeoff": []}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        curves = []
        for r in mine:
            path = r["data"].file("curves.npz") if kind(r) else None
            if path is not None:
                with np.load(path) as arrays:
                    curves.append((f"{describe(r)} "
                                   f"(mAP50 {r['mAP50']:.3f}, F1 {r['f1']:.2f})", dict(arrays)))
        if curves:
            written["curves"].append(figures.curve_overlay(
                f"{model}: class-mean curves on the validation set", curves, out / f"curves_{_file_name(model)}.png"))
        fits = [r for r in mine if r["job"] in ("baseline", "finetune", "fit") and r["data"].history]
        if fits:
            written["losses"].append(figures.loss_curves(
                f"{model}: losses per epoch (baseline, then fine-tuning after pruning)",
                [(describe(r), r["data"].history, _first_epoch(r, fits)) for r in fits],
                out / f"losses_{_file_name(model)}.png"))
    points = [{**r, "kind": kind(r), "label": f"{r['model']}{_ratio(r)}" + {"prune": " no FT", "fit": f" {r['step']}"}
               .get(r["job"], "")} for r in rows if kind(r)]
    if points:
        written["tradeoff"].append(figures.tradeoff(points, [
            ("GFLOPs", "GFLOPs (one image at the study's size)"),
            ("latency_pytorch_ms", "CPU latency, PyTorch, batch 1 (ms)"),
            ("latency_onnxruntime_ms", "CPU latency, ONNX Runtime, batch 1 (ms)")], out / "tradeoff.png"))
    return written


def _markdown(header: list[str], table: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in table])


def _html(header: list[str], table: list[list[str]]) -> str:
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)  # noqa: E731
    return "<table><tr>" + cells(header, "th") + "</tr>" + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in table) \
        + "</table>"


def write_report(rows: list[dict], out: Path, title: str, unfinished: list[str] = ()) -> tuple[Path, Path]:
    """Write report.md and report.html (figures beside them, linked relatively); return both paths. `unfinished`
    names the study's steps that have a W&B run but no results yet (interrupted)."""
    out.mkdir(parents=True, exist_ok=True)
    every = [[_cell(r.get(key), fmt) for _, key, fmt in COLUMNS] for r in rows]
    header = [c for c, _, _ in COLUMNS]
    written = write_figures(rows, out)
    threads = sorted({r.get("latency_threads") for r in rows if r.get("latency_threads")})
    by_hand = sum(r["job"] == "fit" for r in rows)
    note = f"Generated {datetime.date.today()} from {len(rows)} runs. "
    if by_hand < len(rows):
        note += ("The sweep's metrics are those of each run's W&B summary (`final/*`): fits report their best "
                 "checkpoint's validation, `prune` the model right after one-shot pruning (no fine-tuning), `eval` a "
                 "reloaded best checkpoint. ")
    if by_hand:
        note += (f"{by_hand} fit(s) made by hand (job `fit`, named by their run folder) report their best.ckpt's "
                 "validation; their size and latency were measured when this report was made. ")
    note += (f"Latency: CPU, batch 1, median, {'/'.join(map(str, threads)) or '?'} thread(s); checkpoint size "
             "includes optimizer state and raw weights beside the EMA, ONNX size is the deployable model.")
    if unfinished:
        note += (f" Unfinished steps (a W&B run without final results, e.g. an interrupted fit; their cells show -): "
                 f"{', '.join(unfinished)}. Run the same `tea-lightning sweep` command again to finish them.")
    busy = [r for r in rows if _timed_on_a_busy_cpu(r)]
    if busy:
        note += (f" Latencies marked * ({len(busy)} run(s)) were timed while other processes kept more than "
                 f"{BUSY_CPU_SHARE:.0%} of the CPUs busy (column CPU busy): PyTorch eager figures can then be many "
                 "times too slow. Time those checkpoints again on a quiet machine with `tea-lightning benchmark`.")
    sections = [("Before and after fine-tuning", comparison(rows), "tradeoff"), ("Every run", (header, every),
                                                                                "curves"),
                ("Losses", None, "losses")]
    md, body = [f"# {title}", "", note, ""], [f"<h1>{html.escape(title)}</h1><p>{html.escape(note)}</p>"]
    for name, table, figure_key in sections:
        md += [f"## {name}", ""]
        body.append(f"<h2>{html.escape(name)}</h2>")
        if table:
            md += [_markdown(*table), ""]
            body.append(_html(*table))
        for path in written[figure_key]:
            md += [f"![{path.stem}]({path.name})", ""]
            body.append(f'<p><img src="{path.name}" alt="{path.stem}" style="max-width:100%"></p>')
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}")
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    return md_path, html_path


def publish(project: str, study: str) -> str | None:
    """Publish a W&B Report of the study's runs (needs wandb-workspaces and a reachable API); return its URL."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        print("wandb-workspaces is not installed (pip install wandb-workspaces): no W&B Report published.")
        return None
    entity, _, name = project.rpartition("/")
    runset = wr.Runset(entity=entity or None, project=name, filters=f"Config('study') = '{study}'")
    panels = [wr.ScatterPlot(x="final/GFLOPs", y="final/mAP50-95"),
              wr.ScatterPlot(x="final/latency_onnxruntime_ms", y="final/mAP50-95"),
              wr.BarPlot(metrics=["final/mAP50-95", "final/mAP50"]),
              *(wr.LinePlot(x="epoch", y=[f"val/{m}"]) for m in ("mAP50-95", "precision", "recall", "f1")),
              *(wr.LinePlot(x="epoch", y=[f"{s}/{loss}"]) for s in ("train", "val") for loss in LOSS_NAMES),
              wr.RunComparer()]
    report = wr.Report(entity=entity or None, project=name, title=f"Pruning study {study}",
                       description="Baselines, one-shot pruned and fine-tuned models (tea-lightning sweep).",
                       blocks=[wr.PanelGrid(runsets=[runset], panels=panels)])
    report.save()
    return report.url


def _step_of(run: RunData) -> tuple[str | None, str, str]:
    """Return the study, model and step a sweep run belongs to."""
    return run.group, run.config.get("model", "?"), run.config.get("step", run.name)


def report_main(argv: list[str]) -> None:
    """Write the report (Markdown, HTML, figures) of a pruning study from its offline W&B runs and, with
    WANDB_API_KEY, online ones, and of the fits made by hand whose run folders are found under the folders given
    (a baseline fit and pruned fits started from its best.ckpt, compared the same way)."""
    parser = argparse.ArgumentParser(prog="tea-lightning report", description=report_main.__doc__)
    parser.add_argument("runs", type=Path, nargs="*", default=[],
                        help="folders searched for offline W&B runs (e.g. the sweep's --out) and for the run "
                        "folders of fits made by hand (e.g. their --trainer.default_root_dir)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: <first folder>/report)")
    parser.add_argument("--study", default=None, help="only this W&B group (the sweep's study name)")
    parser.add_argument("--project", default="tea-lightning", help="W&B project (entity/project) for online runs")
    parser.add_argument("--latency-runs", type=int, default=30,
                        help="timed runs per latency figure of the fits made by hand (median; 0: not timed, as "
                        "on a busy machine; default: 30)")
    options = parser.parse_args(argv)
    if options.latency_runs < 0:
        raise ConfigError(f"--latency-runs must be 0 or more, got {options.latency_runs}.")
    for folder in options.runs:
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder (give folders that hold W&B runs or fit run folders).")
    runs = offline_runs(options.runs)
    online = api_available()
    if online:
        try:
            known = {r.id for r in runs}
            runs += [r for r in online_runs(options.project, options.study) if r.id not in known]
        except Exception as err:  # noqa: BLE001 - the offline runs still make a report
            print(f"W&B API not reachable ({type(err).__name__}: {err}); the report uses the offline runs only.")
            online = False
    if options.study:
        runs = [r for r in runs if r.group == options.study]
    by_hand = [] if options.study else fit_runs(options.runs, runs, options.latency_runs)
    rows = rows_of(runs + by_hand)
    if not rows:
        where = f"in {', '.join(map(str, options.runs))}" if options.runs else \
            "(no folder given: name the sweep's --out folder, e.g. tea-lightning report runs/study)"
        raise ConfigError(f"no runs to compare found {where}"
                          + (f" for study {options.study!r}" if options.study else "") + ": `report` compares the "
                          "steps of a `tea-lightning sweep` study (W&B runs with final/* results: give its --out "
                          "folder) and fits made by hand (run folders with checkpoints/best.ckpt and config.yaml: "
                          "give their --trainer.default_root_dir); for a single checkpoint use `tea-lightning "
                          "validate --ckpt_path CKPT` and `tea-lightning benchmark CKPT`.")
    out = options.out or (options.runs[0] if options.runs else Path(".")) / "report"
    studies = sorted({r["data"].group for r in rows if r["job"] != "fit"})
    # steps whose run has no final results, unless another run of the step finished (a run left behind when an
    # older version's sweep restarted an interrupted first fit instead of resuming it)
    done = {_step_of(row["data"]) for row in rows}
    unfinished = sorted("/".join(_step_of(run)[1:]) for run in runs if run.job_type in JOB_ORDER
                        and "final/mAP50" not in run.summary and _step_of(run) not in done)
    title = ", ".join([*studies, *([f"{len(by_hand)} fit(s) made by hand"] if by_hand else [])])
    md_path, html_path = write_report(rows, out, f"Pruning study: {title}", unfinished)
    print(f"Report of {len(rows)} runs: {md_path} and {html_path}")
    if not studies:  # W&B Reports are published per study (the sweep's W&B group)
        return
    if online:
        for study in studies:
            url = publish(options.project, study)
            if url:
                print(f"W&B Report: {url}")
    else:
        print("W&B Report: upload the runs with `wandb sync --include-offline <run folders>` (e.g. "
              f"`wandb sync {options.runs[0] if options.runs else '.'}/*/*/wandb/offline-run-*`), then run this "
              "command again with WANDB_API_KEY set (and `pip install wandb-workspaces`) to publish it.")
