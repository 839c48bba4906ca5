"""Single `fit` runs for `tea-lightning report`: a baseline fit and pruned fits made by hand (the README's pruning
commands), compared as the steps of a sweep are. A fit's run folder holds all the report needs, whatever the
logger: checkpoints/best.ckpt (the model, what it scored, whether it was pruned), results.csv (losses and scores per
epoch), plots/val/curves.npz and config.yaml. Size and latency are measured when the report is made, as the sweep
measures each of its steps, so that every model of the report is timed on the same machine."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import torch
import yaml

from tea_lightning.errors import UserError
from tea_lightning.study.wandb_runs import RunData

BEST = Path("checkpoints") / "best.ckpt"
OPTION = "the run folder's"  # how errors about a run's checkpoint name it ("the run folder's PATH ...")


def fit_run_folders(roots: list[Path], skip: set[str]) -> list[Path]:
    """Return the fit run folders (a checkpoints/best.ckpt beside a config.yaml) in or under `roots`, except those
    named in `skip`: the folders of a sweep's fits, named by their W&B run ids, which the sweep's runs describe."""
    found = {ckpt.parent.parent for root in roots for ckpt in Path(root).rglob(str(BEST))}
    return sorted(folder for folder in found if (folder / "config.yaml").is_file() and folder.name not in skip)


def _path_from_root(folder: Path, roots: list[Path]) -> tuple[str, ...]:
    """Return the folder's path from the root it was found in, that root's name included."""
    folder = folder.resolve()
    for root in (Path(r).resolve() for r in roots):
        if folder.is_relative_to(root):
            return folder.relative_to(root.parent).parts
    return folder.parts


def labels_of(folders: list[Path], roots: list[Path]) -> list[str]:
    """Return short names that tell the folders apart, the same form for all: the root each was found in (`report
    runs/a runs/b`: "a", "b"), else that and the run folder's name ("runs/<run id>"), else the whole path from it."""
    paths = [_path_from_root(folder, roots) for folder in folders]
    forms = [lambda p: p[0], lambda p: "/".join(dict.fromkeys((p[0], p[-1]))), lambda p: "/".join(p)]
    for form in forms:
        labels = [form(p) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def pruning_ratio(config: dict, state: dict | None, measured: float) -> float:
    """Return the channel ratio a fit pruned to: its ChannelPruning callback's when it took every scheduled step,
    else `measured` (the share of BatchNorm channels the model lacks against its yaml: a fit interrupted between
    steps, or one that fine-tuned an already pruned checkpoint without the callback)."""
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ChannelPruning"):
            options = callback.get("init_args") or {}
            if state and state.get("steps_done") == len(options.get("schedule") or [0]):
                return float(state.get("channel_ratio") or options.get("pruning_ratio") or measured)
    return round(measured, 2)


def _history(folder: Path, logged: RunData | None) -> list[dict]:
    """Return results.csv's rows as numbers, else (a fit that has not ended, or one older than results.csv) the
    history its W&B run logged, if any."""
    path = folder / "results.csv"
    if not path.is_file():
        return logged.history if logged else []
    with open(path, newline="") as f:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)} for row in
                csv.DictReader(f)]


def read_fit_run(folder: Path, label: str, latency_runs: int, logged: RunData | None = None) -> RunData:
    """Return a fit run folder as the report's RunData (job "fit"): its best checkpoint's validation and size, its
    latency timed now (`latency_runs` 0: not timed), and its per-epoch history (`logged`: its W&B run) and
    curves."""
    from tea_lightning.model.complexity import count_parameters, gflops
    from tea_lightning.model.weights import build_model, check_tea_checkpoint, model_of_checkpoint, \
        set_layer_memory_format
    from tea_lightning.pruning.pruner import batchnorm_channels
    from tea_lightning.study.benchmark import measure

    path = folder / BEST
    checkpoint = check_tea_checkpoint(path, OPTION)
    if not checkpoint.get("validation_summary"):
        raise UserError(f"{path} holds no validation scores (an early tea-lightning wrote it, before checkpoints "
                        f"kept them): `tea-lightning validate --ckpt_path {path}` gives them.")
    hparams = checkpoint["hyper_parameters"]
    model = model_of_checkpoint(checkpoint, path, OPTION)
    full = build_model(hparams["model_cfg"], hparams["nc"])
    measured = 1 - batchnorm_channels(model) / batchnorm_channels(full)
    config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    ratio = pruning_ratio(config, checkpoint.get("callbacks", {}).get("ChannelPruning"), measured)
    img = hparams["img_size"]
    set_layer_memory_format(model, torch.channels_last)  # the layout predict and benchmark run in
    if latency_runs:
        with tempfile.TemporaryDirectory() as tmp:
            results = measure(model, img, Path(tmp) / "model.onnx", runs=latency_runs)
    else:
        results = {"params": count_parameters(model), "GFLOPs": gflops(model, img)}
    results.update(checkpoint["validation_summary"])
    results["ckpt_MB"] = path.stat().st_size / 1e6
    return RunData(folder.name, name=label, job_type="fit",
                   config={"model": Path(hparams["model_cfg"]).stem, "pruning_ratio": ratio,
                           "weights": (config.get("model") or {}).get("weights")},  # where its losses start
                   summary={f"final/{key}": value for key, value in results.items() if value is not None},
                   history=_history(folder, logged), files=[folder / "plots" / "val"], source=str(folder))


def fit_runs(roots: list[Path], logged: list[RunData], latency_runs: int) -> list[RunData]:
    """Return the fit runs in or under `roots` (see fit_run_folders) but not a sweep's (among the W&B runs
    `logged`), each timed in turn with a line saying so; a run whose best checkpoint cannot be read is left out with
    a line that names it and why."""
    by_id = {run.id: run for run in logged}  # a W&B run's id names its run folder
    sweep_steps = {run.id for run in logged if "study" in run.config and "step" in run.config}  # sweep.py's config
    folders = fit_run_folders(roots, sweep_steps)
    runs = []
    for i, (folder, label) in enumerate(zip(folders, labels_of(folders, roots)), 1):
        print(f"[report {i}/{len(folders)}] {label}: reading best.ckpt" + (", timing it" if latency_runs else ""),
              flush=True)
        try:
            runs.append(read_fit_run(folder, label, latency_runs, by_id.get(folder.name)))
        except UserError as err:
            print(f"Left out of the report: {err}")
    return runs
