"""`tea-lightning sweep`: the pruning study as one resumable command.

Per model: baseline `fit` -> `eval` (validate its best checkpoint) -> for each pruning ratio: `prune` (one-shot
prune and validate, no fine-tuning: the collapse) -> `finetune` (prune at epoch 0 of a `fit` from the baseline's
best checkpoint) -> `eval` of the fine-tuned best checkpoint. Each step is one W&B run (group = study, job_type,
tags, config fields) in its own fixed folder `OUT/<model>/<step>` with a fixed run id, so that an interrupted fit
resumes from its `last.ckpt` in the same run folder and W&B run. `OUT/sweep.json` records each finished step and its
results; a rerun skips them, and adding models or ratios to a finished study reuses its baselines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import time
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl

from tea_lightning import CONFIG_DIR
from tea_lightning.errors import ConfigError
from tea_lightning.pruning.pruner import Importance

STATE_FILE = "sweep.json"
METRICS = ("mAP50", "mAP50-95", "precision", "recall", "f1", "fitness")
# Options whose change would make finished steps incomparable with new ones; models and ratios may grow.
FIXED_OPTIONS = ("data", "img", "batch", "epochs", "finetune_epochs", "importance", "distill", "seed", "weights",
                 "baseline", "extra")
ADDED_OPTIONS = {"distill": 0.0}  # options newer than some state files: the value those studies ran with
EPOCH_OPTIONS = ("epochs", "finetune_epochs")  # {"*": N for every model, MODEL: N}


class BestMetrics(pl.Callback):
    """Keeps the validation metrics of the epoch ModelCheckpoint keeps as `best.ckpt` (highest `val/fitness`,
    strictly greater, as ModelCheckpoint compares), in checkpoints too, so a resumed fit still knows them."""

    def __init__(self):
        self.best: dict = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs checkpoint callbacks after all others, so best.ckpt is written with this state updated.
        if trainer.sanity_checking:
            return
        metrics = {key: float(trainer.callback_metrics[f"val/{key}"]) for key in METRICS}
        if not self.best or metrics["fitness"] > self.best["fitness"]:
            self.best = {**metrics, "epoch": trainer.current_epoch}

    def state_dict(self) -> dict:
        return dict(self.best)

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = dict(state_dict)


@dataclass(frozen=True)
class Step:
    """One run of the study."""

    model: str
    job: str  # W&B job_type: baseline, prune, finetune, eval
    ratio: float = 0.0  # pruning ratio of the model this step trains or validates

    @property
    def name(self) -> str:
        return self.job if not self.ratio else f"{self.job}-{self.ratio:g}"

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}"

    @property
    def fits(self) -> bool:
        return self.job in ("baseline", "finetune")

    @property
    def label(self) -> str:
        what = {"baseline": "baseline (fit)", "eval": "evaluate best checkpoint (validate)",
                "prune": "one-shot prune, no fine-tuning (validate)", "finetune": "prune + fine-tune (fit)"}
        return f"{self.model} {'' if not self.ratio else f'ratio {self.ratio:g} '}{what[self.job]}"


def plan(models: list[str], ratios: list[float]) -> list[Step]:
    """Return the study's steps in the order they depend on each other."""
    steps = []
    for model in models:
        steps += [Step(model, "baseline"), Step(model, "eval")]
        for ratio in ratios:
            steps += [Step(model, "prune", ratio), Step(model, "finetune", ratio), Step(model, "eval", ratio)]
    return steps


def prune_flags(ratio: float, importance: str = "l2", seed: int = 0) -> list[str]:
    """Return the command-line flags that add a ChannelPruning callback pruning `ratio` at the start of epoch 0
    (under validate: once, before evaluation)."""
    return ["--trainer.callbacks+=tea_lightning.ChannelPruning", "--trainer.callbacks.pruning_ratio", str(ratio),
            "--trainer.callbacks.schedule", "[0]", "--trainer.callbacks.importance", importance,
            "--trainer.callbacks.seed", str(seed)]


class Study:
    """The state file and the composition of each step's `tea-lightning` command."""

    def __init__(self, options: argparse.Namespace):
        self.options = options
        self.out: Path = options.out
        self.path = self.out / STATE_FILE
        fixed = {key: _jsonable(getattr(options, key)) for key in FIXED_OPTIONS}
        if self.path.is_file():
            self.state = json.loads(self.path.read_text())
            before = {k: self.state["options"].get(k, ADDED_OPTIONS.get(k)) for k in FIXED_OPTIONS}
            for key in EPOCH_OPTIONS:  # state files from before per-model epochs hold one number
                if not isinstance(before[key], dict):
                    before[key] = {"*": str(before[key])}
            studied = {key.partition("/")[0] for key in self.state["steps"]}
            changed = [k for k in FIXED_OPTIONS if not _same_option(k, before[k], fixed[k], studied)]
            if changed:
                raise ConfigError(
                    f"{self.path} belongs to a study made with other options ("
                    + ", ".join(f"--{k.replace('_', '-')} was {_shown(before[k])}, now {_shown(fixed[k])}"
                                for k in changed)
                    + "): give another --out for a new study, or the same options to continue this one.")
            if options.study and options.study != self.state["study"]:
                raise ConfigError(f"{self.path} belongs to study {self.state['study']!r}, not {options.study!r}.")
        else:
            # A random token keeps run ids unique per study in the W&B project (and fixed across restarts).
            self.state = {"study": options.study or self.out.resolve().name, "token": uuid.uuid4().hex[:6],
                          "options": fixed, "steps": {}}

    @property
    def name(self) -> str:
        return self.state["study"]

    def finished(self, step: Step) -> dict | None:
        return self.state["steps"].get(step.key)

    def record(self, step: Step, entry: dict) -> None:
        """Mark a step finished with its results."""
        self.state["steps"][step.key] = entry
        self.save()

    def save(self) -> None:
        """Write the state file, atomically so that an interruption never corrupts it. Written before the first
        step too: its token names every run folder, so a study interrupted in its first fit must find it again to
        resume that fit from its last.ckpt."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)

    def run_id(self, step: Step) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.name}-{self.state['token']}-{step.model}-{step.name}")

    def root(self, step: Step) -> Path:
        return self.out / step.model / step.name

    def run_folder(self, step: Step) -> Path:
        """Return the run folder the CLI will use: `<root>/<project>/<run id>` (see tea_lightning/rundir.py)."""
        return self.root(step) / self.options.project / self.run_id(step)

    def checkpoint(self, model: str, ratio: float) -> Path:
        """Return the best checkpoint of the finished fit that made this model (given baselines included)."""
        if not ratio and model in self.options.baseline:
            return Path(self.options.baseline[model])
        return Path(self.state["steps"][Step(model, "finetune" if ratio else "baseline", ratio).key]["checkpoint"])

    def command(self, step: Step) -> list[str]:
        """Return the `tea-lightning` arguments of a step."""
        o = self.options
        config = {"study": self.name, "step": step.name, "model": step.model, "pruning_ratio": step.ratio,
                  "importance": o.importance, "distill": o.distill, "seed": o.seed, "img_size": o.img}
        tags = [self.name, step.model, step.job] + ([f"ratio-{step.ratio:g}"] if step.ratio else [])
        args = ["fit" if step.fits else "validate", "--config", str(CONFIG_DIR / f"{step.model}.yaml"), *o.extra,
                "--data.data_yaml", str(o.data), "--data.img_size", str(o.img), "--data.batch_size", str(o.batch),
                "--seed_everything", str(o.seed), "--model.plots", "true",
                "--trainer.default_root_dir", str(self.root(step)),
                "--trainer.logger.init_args.project", o.project,
                "--trainer.logger.init_args.offline", "false" if o.online else "true",
                "--trainer.logger.init_args.id", self.run_id(step), "--trainer.logger.init_args.resume", "allow",
                "--trainer.logger.init_args.name", f"{step.model} {step.name}",
                "--trainer.logger.init_args.group", self.name, "--trainer.logger.init_args.job_type", step.job,
                "--trainer.logger.init_args.tags", json.dumps(tags),
                "--trainer.logger.init_args.config", json.dumps(config)]
        if step.fits:
            epochs = _epochs_for(o.epochs if step.job == "baseline" else o.finetune_epochs, step.model)
            args += ["--trainer.max_epochs", str(epochs), "--trainer.callbacks+=tea_lightning.study.sweep.BestMetrics"]
            last = self.run_folder(step) / "checkpoints" / "last.ckpt"
            if last.is_file():  # an interrupted fit: go on where it stopped
                args += ["--ckpt_path", str(last)]
        if step.job == "baseline" and step.model in o.weights:
            args += ["--model.weights", str(o.weights[step.model])]
        elif step.job in ("prune", "finetune"):
            baseline = str(self.checkpoint(step.model, 0.0))
            args += ["--model.weights", baseline, *prune_flags(step.ratio, o.importance, o.seed)]
            if step.job == "finetune" and o.distill:
                args += ["--model.teacher", baseline, "--model.distill_weight", str(o.distill)]
        elif step.job == "eval":
            args += ["--ckpt_path", str(self.checkpoint(step.model, step.ratio))]
        return args


def _same_option(key: str, before, now, studied: set[str]) -> bool:
    """Return whether an option of the state file still holds; epochs only need to agree for the models with
    finished steps (a model new to the study may get its own)."""
    if key not in EPOCH_OPTIONS:
        return before == now
    return all(_epochs_for(before, m) == _epochs_for(now, m) for m in studied)


def _shown(value) -> str:
    """Return an option's value as it is written on the command line."""
    if isinstance(value, dict):
        return " ".join(v if k == "*" else f"{k}={v}" for k, v in value.items()) or "none"
    return repr(value)


def _jsonable(value):
    return {k: str(v) for k, v in value.items()} if isinstance(value, dict) else \
        str(value) if isinstance(value, Path) else value


def run_step(study: Study, step: Step) -> dict:
    """Run one step in-process and return its state entry; its results also go to the W&B run's summary."""
    import wandb

    from tea_lightning.cli import cli_main
    from tea_lightning.study.benchmark import measure

    try:
        cli = cli_main(study.command(step))
        trainer = cli.trainer
        if step.fits:
            metrics = next(c.best for c in trainer.callbacks if isinstance(c, BestMetrics))
            checkpoint = Path(trainer.checkpoint_callback.best_model_path)
        else:
            metrics = {key: float(trainer.callback_metrics[f"val/{key}"]) for key in METRICS}
            checkpoint = None if step.job == "prune" else study.checkpoint(step.model, step.ratio)
        folder = study.run_folder(step)
        results = {**metrics, **measure(cli.model.model, study.options.img, folder / "model.onnx",
                                        runs=study.options.latency_runs),
                   "ckpt_MB": checkpoint.stat().st_size / 1e6 if checkpoint else None}
        experiment = trainer.logger.experiment
        experiment.config.update({"params": results["params"], "GFLOPs": results["GFLOPs"]}, allow_val_change=True)
        experiment.summary.update({f"final/{k}": v for k, v in results.items() if v is not None})
        curves = folder / "plots" / "val" / "curves.npz"
        if curves.is_file():  # beside the run, so `tea-lightning report` can overlay curves, offline or online
            experiment.save(str(curves), base_path=str(curves.parent), policy="now")
        experiment.finish()
    finally:
        # Lightning's WandbLogger adopts a run left open, which would log the next step into this one.
        if wandb.run is not None:
            wandb.run.finish(exit_code=1)
    return {"run_id": study.run_id(step), "run_folder": str(folder), "job_type": step.job, "ratio": step.ratio,
            "checkpoint": str(checkpoint) if checkpoint else None, "results": results}


def _epochs(values: list[str], option: str, models: list[str]) -> dict[str, int]:
    """Parse N (every model) and MODEL=N (one model) values into {"*": N, MODEL: N}; every model must get one."""
    epochs = {}
    for value in values:
        model, sep, number = value.rpartition("=")
        key = model if sep else "*"
        if (sep and model not in models) or not number.isdigit() or int(number) < 1 or key in epochs:
            raise ConfigError(f"{option} takes one number of epochs (at least 1) for every model and MODEL=N for "
                              f"single models of --models ({', '.join(models)}), each once; got {value!r}.")
        epochs[key] = int(number)
    missing = [m for m in models if m not in epochs and "*" not in epochs]
    if missing:
        raise ConfigError(f"{option} gives no number for {', '.join(missing)}: add N for every model or MODEL=N.")
    return epochs


def _epochs_for(epochs: dict[str, int], model: str) -> int:
    return epochs.get(model, epochs.get("*"))


def _pairs(values: list[str], option: str, models: list[str]) -> dict[str, Path]:
    """Parse MODEL=PATH values, checking the model is swept and the file exists."""
    pairs = {}
    for value in values:
        model, sep, path = value.partition("=")
        if not sep or model not in models:
            raise ConfigError(f"{option} takes MODEL=PATH with MODEL one of --models ({', '.join(models)}), "
                              f"got {value!r}.")
        if not Path(path).is_file():
            raise ConfigError(f"{option} {value}: {path} does not exist.")
        pairs[model] = Path(path).resolve()
    return pairs


def parse(argv: list[str]) -> argparse.Namespace:
    """Return the checked options; arguments after `--` go unchanged to every tea-lightning run."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="tea-lightning sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Arguments after `--` are passed to every run (e.g. -- --data.workers 4).")
    parser.add_argument("--data", type=Path, required=True, help="the YOLO data.yaml")
    parser.add_argument("--models", nargs="+", default=["yolov5n", "yolov5s"],
                        help="models with a configs/<model>.yaml (default: yolov5n yolov5s)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5], help="pruning ratios (0.3 0.5)")
    parser.add_argument("--img", type=int, default=416, help="image size (default: 416)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default: 4)")
    parser.add_argument("--epochs", nargs="+", default=["100"], metavar="N|MODEL=N",
                        help="baseline epochs: one number for every model, MODEL=N for one (e.g. 100 yolov5m=50; "
                             "default: 100)")
    parser.add_argument("--finetune-epochs", nargs="+", default=["30"], metavar="N|MODEL=N",
                        help="fine-tuning epochs, given like --epochs (default: 30)")
    parser.add_argument("--weights", nargs="*", default=[], metavar="MODEL=PT",
                        help="official YOLOv5 .pt to start a baseline from (default: from scratch)")
    parser.add_argument("--baseline", nargs="*", default=[], metavar="MODEL=CKPT",
                        help="an already trained baseline .ckpt to use instead of fitting one")
    parser.add_argument("--importance", default="l2", choices=typing.get_args(Importance),
                        help="channel importance of the pruning steps (default: l2; taylor recovered the most "
                             "accuracy on tea_shoots)")
    parser.add_argument("--distill", type=float, default=0.0, metavar="WEIGHT",
                        help="fine-tune with distillation from the unpruned baseline at this loss weight "
                             "(e.g. 1; default: 0, off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder (default: runs/study)")
    parser.add_argument("--study", default=None, help="W&B group name (default: the --out folder's name)")
    parser.add_argument("--project", default="tea-lightning", help="W&B project (default: tea-lightning)")
    parser.add_argument("--online", action="store_true", help="log to W&B online (after `wandb login`)")
    parser.add_argument("--latency-runs", type=int, default=30, help="timed runs per latency figure (default: 30)")
    options = parser.parse_args(argv[:split])
    options.extra = argv[split + 1:]
    missing = [m for m in options.models if not (CONFIG_DIR / f"{m}.yaml").is_file()]
    if missing:
        known = sorted(p.stem for p in CONFIG_DIR.glob("yolov5*.yaml"))
        raise ConfigError(f"--models {' '.join(missing)}: no configs/<model>.yaml; known: {', '.join(known)}.")
    if len(set(options.models)) != len(options.models) or len(set(options.ratios)) != len(options.ratios):
        raise ConfigError("--models and --ratios must not repeat a value.")
    if not all(0 < r < 1 for r in options.ratios):
        raise ConfigError(f"--ratios must lie between 0 and 1 (exclusive), got {options.ratios}.")
    options.epochs = _epochs(options.epochs, "--epochs", options.models)
    options.finetune_epochs = _epochs(options.finetune_epochs, "--finetune-epochs", options.models)
    if options.distill < 0:
        raise ConfigError(f"--distill must be >= 0 (0: no distillation), got {options.distill:g}.")
    if options.img % 32 or min(options.batch, options.latency_runs) < 1:
        raise ConfigError("--img must be a multiple of 32; --batch and --latency-runs at least 1.")
    if not options.data.is_file():
        raise ConfigError(f"--data {options.data} does not exist.")
    if options.study is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", options.study):
        raise ConfigError(f"--study {options.study!r}: use letters, digits, '.', '_' and '-' only.")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("the sweep logs every run to W&B: pip install wandb")
    options.data, options.out = options.data.resolve(), options.out.resolve()
    options.weights = _pairs(options.weights, "--weights", options.models)
    options.baseline = _pairs(options.baseline, "--baseline", options.models)
    return options


def sweep_main(argv: list[str]) -> None:
    """Run the pruning study (baseline, prune, fine-tune, evaluate per model and ratio), resumably, logged to W&B."""
    study = Study(parse(argv))
    steps = [s for s in plan(study.options.models, study.options.ratios)
             if not (s.job == "baseline" and s.model in study.options.baseline)]
    print(f"Study {study.name!r} in {study.out}: {len(steps)} steps, "
          f"{sum(1 for s in steps if study.finished(s))} already finished")
    study.save()
    started = time.monotonic()
    for i, step in enumerate(steps, 1):
        head = f"[sweep {i}/{len(steps)}] {step.label}"
        if study.finished(step):
            print(f"{head}: finished before, skipped", flush=True)
            continue
        print(f"{head}: running in {study.root(step)}", flush=True)
        begin = time.monotonic()
        entry = run_step(study, step)
        study.record(step, entry)
        r = entry["results"]
        print(f"{head}: done in {time.monotonic() - begin:.0f} s: mAP50 {r['mAP50']:.4f}, mAP50-95 "
              f"{r['mAP50-95']:.4f}, {r['params']:,} params, {r['GFLOPs']:.2f} GFLOPs "
              f"(total {time.monotonic() - started:.0f} s)", flush=True)
    print(f"Study finished: state in {study.path}. Report: tea-lightning report {study.out}")
