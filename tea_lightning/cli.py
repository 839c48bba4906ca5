"""`tea-lightning`: LightningCLI's fit/validate/test/predict, plus `demo` and `demo-data`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import pydoc
import random
import signal
import sys
import tempfile
import warnings
from pathlib import Path

# The yolov5 package imports pkg_resources; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

import torch  # noqa: E402
import yaml  # noqa: E402
from jsonargparse import Namespace  # noqa: E402
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment  # noqa: E402
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from pytorch_lightning.callbacks import Checkpoint  # noqa: E402
from pytorch_lightning.loggers import CSVLogger, WandbLogger  # noqa: E402
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn  # noqa: E402
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException  # noqa: E402

from tea_lightning import CONFIG_DIR  # noqa: E402
from tea_lightning.checkpoints import (  # noqa: E402
    BestCheckpoint, LastCheckpoint, SaveOnInterrupt, check_slurm_resume)
from tea_lightning.data.datamodule import YoloDataModule  # noqa: E402
from tea_lightning.history import EpochHistory  # noqa: E402
from tea_lightning.errors import ConfigError, UserError  # noqa: E402
from tea_lightning.model.amp_check import AmpCheck  # noqa: E402
from tea_lightning.model.detector import Detector  # noqa: E402
from tea_lightning.model.speed import TrainingSpeed  # noqa: E402
from tea_lightning.model.weights import check_tea_checkpoint  # noqa: E402
from tea_lightning.model.writer import DetectionWriter  # noqa: E402
from tea_lightning.pruning.callback import ChannelPruning, check_resumed_with_pruning  # noqa: E402
from tea_lightning.rundir import run_dir  # noqa: E402
from tea_lightning.study.benchmark import benchmark_main  # noqa: E402
from tea_lightning.study.report import report_main  # noqa: E402
from tea_lightning.study.sweep import sweep_main  # noqa: E402

# demo and sweep run LightningCLI in-process with their own arguments on purpose. (Set after the imports: importing
# the model module puts UserWarnings back on, ahead of earlier filters.)
warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended", category=UserWarning)
# torch 2.14 deprecates a class that Lightning 2.6's own code uses, and says so at every fit, validate and predict.
warnings.filterwarnings("ignore", message="`isinstance\\(treespec, LeafSpec\\)` is deprecated",
                        category=FutureWarning)

LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc")  # --ckpt_path values that Lightning resolves itself


def trainer_defaults() -> dict:
    """Return what every run gets unless told otherwise: W&B offline logging (synced later with `wandb sync`),
    best (by YOLOv5's fitness) and last checkpoints written atomically, a checkpoint on SIGTERM/Ctrl+C, YOLOv5's
    AMP check, a writer for `predict`, the training speed and each epoch's figures (results.csv, results.png, and a
    line per epoch in logs that are not a terminal).
    Built anew for each run because callbacks keep state."""
    return {
        "default_root_dir": "runs",
        "logger": {"class_path": "pytorch_lightning.loggers.WandbLogger",
                   "init_args": {"project": "tea-lightning", "offline": True}},
        "plugins": [{"class_path": "tea_lightning.checkpoints.AtomicCheckpointIO"}],
        "callbacks": [
            BestCheckpoint(),
            LastCheckpoint(),  # after every epoch, for resuming after a crash
            SaveOnInterrupt(),
            AmpCheck(),
            DetectionWriter(),
            TrainingSpeed(),
            EpochHistory(),  # after TrainingSpeed, whose epoch times it prints
        ],
    }


class RunConfig(SaveConfigCallback):
    """Saves the resolved config as `config.yaml` in the run folder and records it in every logger (W&B run
    config included), so each run says exactly how it was made."""

    def __init__(self, parser, config, **kwargs):
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, folder / "config.yaml", skip_unset=False, overwrite=True)
        datamodule = trainer.datamodule
        # plain YAML types (as config.yaml has them): as_dict() keeps jsonargparse's Path objects for the --config
        # files, which made CSVLogger's and TensorBoard's hparams.yaml unreadable by yaml.safe_load and Lightning
        config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False, skip_validation=True))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config, "stage": stage,
                                    **({"data": datamodule.dataset_info()} if datamodule else {})})


def _launched_processes() -> int:
    """Return how many processes torchrun or SLURM's srun started for this run (1 when Lightning starts them, or none
    did): they share no process group yet when the command line is read."""
    # the counts read here, not from the environments' world_size(): building a SLURMEnvironment runs Lightning's
    # checks of srun's options, which belong to the Trainer that comes later
    if TorchElasticEnvironment.detect():
        return int(os.environ.get("WORLD_SIZE", 1))
    if SLURMEnvironment.detect():
        return int(os.environ.get("SLURM_NTASKS", 1))
    return 1


# Settings of a run rather than of the model: what this command line (or its config files) says wins over the
# hyperparameters saved in --ckpt_path, which Lightning's CLI otherwise writes over every --model option.
RUN_SETTINGS = ("conf_thres", "iou_thres", "max_det", "predict_conf_thres", "predict_iou_thres", "plots")


class TeaCLI(LightningCLI):
    """LightningCLI that ties the data set's classes, image size and batch size to the model, and keeps this run's
    evaluation and prediction settings when a checkpoint is given."""

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)  # runs before Lightning reads the checkpoint's hyperparameters
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        if config.get("seed_everything") is True:
            # "a random seed", as --help says; Lightning 2.6 seeds 0 instead. The DDP processes that Lightning
            # launches (LOCAL_RANK > 0) take the seed the first one drew, which they inherit as PL_GLOBAL_SEED.
            inherited = os.environ.get("PL_GLOBAL_SEED") if int(os.environ.get("LOCAL_RANK", 0)) > 0 else None
            if not inherited and (launched := _launched_processes()) > 1:
                raise ConfigError(f"--seed_everything true: the {launched} processes of this run were "
                                  "started by a launcher (torchrun, srun) and would each draw their own seed, while "
                                  "config.yaml records the first one's. Give them one number, e.g. "
                                  "--seed_everything $RANDOM on the launch line.")
            config.seed_everything = int(inherited or random.SystemRandom().randrange(2**31))
            rank_zero_info(f"Random seed: {config.seed_everything} (saved in the run's config.yaml)")
        self.run_settings = {name: config.model[name] for name in RUN_SETTINGS}
        ckpt_path = config.get("ckpt_path")
        # Lightning reads the file next and ends in a traceback when it is missing, truncated or not one of ours;
        # its keywords, model registry names and remote URLs are left to it
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_KEYWORDS and not ckpt_path.startswith("registry") \
                and "://" not in ckpt_path:
            checkpoint = check_tea_checkpoint(ckpt_path, "--ckpt_path")
            if self.config.get("subcommand") == "fit":  # here, before the run folder and the W&B run are made
                check_resumed_with_pruning(checkpoint, _configures(config.trainer.callbacks, ChannelPruning), ckpt_path)
        if self.config.get("subcommand") == "fit" and not ckpt_path:
            check_slurm_resume(Path(config.trainer.default_root_dir or "."))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.nc", "model.nc", apply_on="instantiate")
        parser.link_arguments("data.names", "model.names", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data.batch_size", "model.batch_size")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        _check_writable(Path(trainer.default_root_dir or "."))
        for name, value in self.run_settings.items():
            config.model[name] = value
        if str(trainer.precision) in ("16-mixed", "16") and (trainer.accelerator == "cpu" or (
                trainer.accelerator == "auto" and not torch.cuda.is_available())):
            # Lightning runs bf16-mixed instead, with a warning, and config.yaml would record 16-mixed
            rank_zero_info("--trainer.precision 16-mixed: CPUs have no float16 AMP; running bf16-mixed (recorded so "
                           "in config.yaml).")
            trainer.precision = "bf16-mixed"
        if config.get("ckpt_path"):
            # Every weight comes from the checkpoint; LightningCLI copies its saved --model.weights into the config,
            # a file that need not exist any more (a checkpoint moved to another machine).
            config.model.weights = None
        if _configures(trainer.callbacks, DetectionWriter):
            # a writer given on the command line (`--trainer.callbacks.save_conf true`, `.output_dir`) replaces the
            # default one, which would write the same files
            self._drop_default_callbacks(DetectionWriter)
        if self.subcommand in ("validate", "test", "predict"):
            if not config.get("ckpt_path") and not config.model.weights:
                rank_zero_warn(f"{self.subcommand} without --ckpt_path or --model.weights: the model's weights are "
                               "freshly initialised, so what it finds means nothing. Give a trained checkpoint "
                               "(--ckpt_path best.ckpt) or weights (--model.weights yolov5n.pt).")
            config.model.teacher = None  # only training distils; a checkpoint names a teacher that may be gone
            # Only fit writes checkpoints (best, last, on an interruption); elsewhere Lightning would still restore
            # the checkpoint callbacks' state from --ckpt_path and warn that their folder has changed
            trainer.enable_checkpointing = False
            self._drop_default_callbacks(Checkpoint)
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            if getattr(logger, "init_args", None) is None:
                continue
            if logger.class_path.endswith("WandbLogger") and importlib.util.find_spec("wandb") is None:
                rank_zero_warn("wandb is not installed: logging to CSV files in the run folder instead "
                               "(pip install wandb to track runs in Weights & Biases).")
                logger.class_path = "pytorch_lightning.loggers.CSVLogger"
                logger.init_args = Namespace(name=logger.init_args.get("project") or "tea-lightning",
                                             save_dir=logger.init_args.get("save_dir"))
            init_args = logger.init_args
            # Loggers write under save_dir (W&B's default is the working folder); unless one is given, keep a
            # run's logs with its checkpoints and plots in default_root_dir.
            if init_args.get("save_dir") in (None, ".", ""):
                init_args.save_dir = trainer.default_root_dir or "."
            if self.subcommand == "fit" and config.get("ckpt_path"):
                _continue_in_run_folder(logger, Path(config.ckpt_path))
        if self.subcommand == "fit" and config.get("ckpt_path"):
            # A resumed fit writes on in its own checkpoint folder on purpose; Lightning's "Checkpoint directory ...
            # exists and is not empty" would read as a warning about it (the filter ends with the run: cli_main)
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")

    def _drop_default_callbacks(self, kind: type) -> None:
        """Leave the `kind` callbacks out of this run's trainer defaults (trainer_defaults() builds them per run)."""
        self.trainer_defaults["callbacks"] = [callback for callback in self.trainer_defaults["callbacks"]
                                              if not isinstance(callback, kind)]

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        _fall_back_from_failed_wandb(self.trainer)

    def after_run(self) -> None:
        """Print where the run's files and its W&B run are."""
        trainer = self.trainer
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                experiment = logger.experiment
                where = getattr(experiment, "dir", None)
                print(f"W&B run: {Path(where).parent if where else logger.save_dir}"
                      + (" (offline: upload later with `wandb sync <that folder>`)"
                         if getattr(experiment.settings, "mode", "") == "offline" else ""))
        if not trainer.is_global_zero:  # the other processes' loggers have no run folder
            return
        print(f"Run folder: {run_dir(trainer)}")
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if self.subcommand == "fit" else ""
        if best:
            print(_best_checkpoint_summary(Path(best)))


def _best_checkpoint_summary(path: Path) -> str:
    """Return a line saying which epoch `path` (best.ckpt) holds and what it scored in its validation."""
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: the tensors stay on disk
    scores = saved.get("validation_summary", {})
    figures = ", ".join(f"{key} {scores[key]:.4f}" for key in ("mAP50", "mAP50-95", "precision", "recall")
                        if key in scores)
    return f"Best checkpoint (epoch {saved['epoch']}{': ' + figures if figures else ''}): {path}"


def _check_writable(folder: Path) -> None:
    """Fail before any work when the output folder cannot take files (read-only, a file in the way)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"--trainer.default_root_dir {folder} cannot be written to ({err.strerror or err}): give "
                          "a writable folder for checkpoints, plots and logs.") from err


def _configures(callbacks: list | None, kind: type) -> bool:
    """Return whether the parsed `--trainer.callbacks` include a `kind` (or a subclass of it)."""
    classes = [pydoc.locate(callback.class_path) for callback in callbacks or [] if "class_path" in callback]
    return any(isinstance(cls, type) and issubclass(cls, kind) for cls in classes)


def _continue_in_run_folder(logger, checkpoint: Path) -> None:
    """Give the logger the run id/version of `checkpoint` when it lies in `<save_dir>/<name>/<run>/checkpoints/` of
    this very logger, so a resumed fit writes on in its own run folder and W&B run. Not for CSVLogger, which
    deletes an existing metrics.csv: a resumed CSV run gets a new version folder and the old one stays whole."""
    if logger.class_path.endswith("CSVLogger"):
        return
    run = checkpoint.resolve().parent.parent
    init_args = logger.init_args
    wandb = logger.class_path.endswith("WandbLogger")
    name = init_args.get("project" if wandb else "name") or ""  # no name: runs sit right in save_dir
    if checkpoint.parent.name != "checkpoints" or run.parent != (Path(init_args.save_dir) / name).resolve():
        return
    if wandb:
        init_args.id, init_args.resume = run.name, "allow"
    else:
        init_args.version = run.name


def _fall_back_from_failed_wandb(trainer) -> None:
    """Start the W&B run now and, if W&B cannot start (bad settings, service not starting, no disk), log to CSV
    in the same run folder rather than losing the training run."""
    loggers = trainer.loggers
    for i, logger in enumerate(loggers):
        if not isinstance(logger, WandbLogger) or not trainer.is_global_zero:
            continue
        try:
            logger.experiment
        except Exception as err:  # noqa: BLE001 - whatever stops W&B must not stop training
            rank_zero_warn(f"W&B could not start ({type(err).__name__}: {err}); this run logs to CSV files in its "
                           "run folder instead. Check `wandb` settings (WANDB_MODE, WANDB_DIR) for the next run.")
            loggers[i] = CSVLogger(logger.save_dir, name=logger.name, version=logger.version)
    trainer.loggers = loggers


def cli_main(args: list[str] | None = None) -> TeaCLI:
    """Run one LightningCLI subcommand and return the CLI (its trainer and model stay inspectable)."""
    with warnings.catch_warnings():  # warning filters that one run sets (TeaCLI) end with it
        cli = TeaCLI(Detector, YoloDataModule, save_config_callback=RunConfig, seed_everything_default=0,
                     trainer_defaults=trainer_defaults(), auto_configure_optimizers=False, args=args)
        cli.after_run()
    return cli


def demo(argv: list[str]) -> None:
    """Generate the synthetic data set, train YOLOv5n on it, validate the best checkpoint and say where it all is."""
    from tea_lightning.data.synthetic import make_synthetic_dataset

    parser = argparse.ArgumentParser(prog="tea-lightning demo", description=demo.__doc__)
    parser.add_argument("--out", default="demo", help="folder for the data set and the run (default: demo)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    options = parser.parse_args(argv)
    if options.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {options.epochs}.")
    out = Path(options.out)
    data_yaml = make_synthetic_dataset(out / "data", seed=0)
    print(f"Synthetic data set written to {data_yaml.parent}")
    common = ["--config", str(CONFIG_DIR / "demo.yaml"), "--data.data_yaml", str(data_yaml),
              "--trainer.default_root_dir", str(out / "runs")]
    fit = cli_main(["fit", *common, "--trainer.max_epochs", str(options.epochs)])
    best = fit.trainer.checkpoint_callback.best_model_path  # the fit has said which it is and what it scored
    if isinstance(fit.trainer.logger, WandbLogger):
        # Lightning's WandbLogger adopts a W&B run left open: the validation would log into the fit's run and
        # folder, overwriting its config.yaml.
        fit.trainer.logger.experiment.finish()
    cli_main(["validate", *common, "--ckpt_path", best])


def demo_data(argv: list[str]) -> None:
    """Write the synthetic tea-bud data set (YOLO format) to a folder."""
    from tea_lightning.data.synthetic import make_synthetic_dataset

    parser = argparse.ArgumentParser(prog="tea-lightning demo-data", description=demo_data.__doc__)
    parser.add_argument("out", help="folder to write images/, labels/ and data.yaml to")
    parser.add_argument("--n-train", type=int, default=64, help="training images (default: 64)")
    parser.add_argument("--n-val", type=int, default=16, help="validation images (default: 16)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn scenes (default: 0)")
    options = parser.parse_args(argv)
    path = make_synthetic_dataset(options.out, n_train=options.n_train, n_val=options.n_val,
                                  image_size=options.image_size, seed=options.seed)
    print(f"Wrote {path}")


def export_pt(argv: list[str]) -> None:
    """Write a checkpoint's (EMA) model as a YOLOv5 .pt that YOLOv5's own detect.py/val.py/export.py load."""
    from tea_lightning.model.complexity import count_parameters
    from tea_lightning.model.weights import save_yolov5_checkpoint

    parser = argparse.ArgumentParser(prog="tea-lightning export-pt", description=export_pt.__doc__)
    parser.add_argument("checkpoint", help="a tea-lightning .ckpt (pruned or not)")
    parser.add_argument("output", help="the .pt file to write")
    options = parser.parse_args(argv)
    output = Path(options.output)
    if output.is_dir():
        raise ConfigError(f"{options.output} is a folder: give the path of the .pt file to write, e.g. "
                          f"{output / (Path(options.checkpoint).stem + '.pt')}.")
    if output.suffix == ".ckpt" or output.resolve() == Path(options.checkpoint).resolve():
        # a half-precision model without optimizer, EMA or pruning state must not take a checkpoint's place
        raise ConfigError(f"{options.output}: export-pt writes a YOLOv5 .pt (float16, model only) and does not "
                          f"overwrite or imitate a checkpoint; name the output .pt, e.g. "
                          f"{output.with_suffix('.pt')}.")
    detector = Detector.from_checkpoint(options.checkpoint)
    path = save_yolov5_checkpoint(detector.model, detector.names, options.output)
    print(f"Wrote {path}: {count_parameters(detector.model):,} parameters, classes {detector.names}, float16 weights "
          "(YOLOv5's format: its detect.py, val.py and export.py load it)")


def check_data(argv: list[str]) -> None:
    """Print a data set's summary (images, instances per class, label format, problems) without training."""
    from tea_lightning.data.labels import DataError, load_split, read_data_yaml

    parser = argparse.ArgumentParser(prog="tea-lightning check-data", description=check_data.__doc__)
    parser.add_argument("data_yaml", help="a YOLO data.yaml")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when any problem is found (for a CI check of a data set)")
    options = parser.parse_args(argv)
    spec = read_data_yaml(options.data_yaml)
    print(f"{spec.yaml_path}: {spec.nc} classes ({', '.join(spec.names)})")
    problems = 0
    for split in spec.splits:
        index = load_split(spec, split)
        problems += len(index.problems)
        print(index.summary(split, spec.names))
    if problems:
        print(f"{problems} problem(s): the rows and images named above are skipped in training and validation.")
        if options.strict:
            raise DataError(f"{spec.yaml_path}: {problems} problem(s), listed above (--strict).")


EXTRA_COMMANDS = {"demo": demo, "demo-data": demo_data, "export-pt": export_pt, "check-data": check_data,
                  "sweep": sweep_main, "report": report_main, "benchmark": benchmark_main}


def _user_error_in(err: BaseException | None) -> Exception | None:
    """Return the UserError (or Lightning's MisconfigurationException: a trainer option that cannot work) that `err`
    is or was raised from (jsonargparse wraps errors of callbacks' options)."""
    while err is not None and not isinstance(err, (UserError, MisconfigurationException)):
        err = err.__cause__ or err.__context__
    return err


def _with_installed_configs(args: list[str]) -> list[str]:
    """Return `args` with each `--config configs/...` that is not in the working folder replaced by the copy installed
    with the package, saying so: README's commands name the repository's configs/, which a `pip install` without a
    checkout (or a run from another folder) does not have."""
    resolved = list(args)
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            index, prefix = i, "--config="
        elif arg in ("--config", "-c") and i + 1 < len(args):
            index, prefix = i + 1, ""
        else:
            continue
        given = Path(resolved[index].removeprefix(prefix))
        installed = CONFIG_DIR.joinpath(*given.parts[1:]) if given.parts[:1] == ("configs",) else None
        if given.exists() or installed is None or not installed.is_file():
            continue
        print(f"{given} is not in {Path.cwd()}: using the copy installed with tea-lightning, {installed}",
              file=sys.stderr)
        resolved[index] = prefix + str(installed)
    return resolved


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `tea-lightning` command: errors the user can fix end in their message and status 1."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in ("-h", "--help"):
            width = max(map(len, EXTRA_COMMANDS))
            print("Besides fit, validate, test and predict (below), each with its own --help:\n" + "".join(
                f"  tea-lightning {name:<{width}}  {fn.__doc__.splitlines()[0]}\n"
                for name, fn in EXTRA_COMMANDS.items()))
        if args and args[0] in EXTRA_COMMANDS:
            EXTRA_COMMANDS[args[0]](args[1:])
        else:
            cli_main(_with_installed_configs(args))
        sys.stdout.flush()  # here, so that a reader gone away (below) is met inside this handler, not at exit
    except BrokenPipeError:
        # the reader of our output has gone (`tea-lightning check-data ... | head`): stop quietly, as Unix tools do;
        # Python would otherwise report the pipe again while flushing stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except Exception as err:
        cause = _user_error_in(err)
        if cause is None:
            raise  # a bug: the traceback is what a report needs
        sys.exit(f"error: {cause}")
    except SIGTERMException:
        sys.exit(128 + 15)  # what a shell reports for a process ended by SIGTERM; SaveOnInterrupt said the rest


if __name__ == "__main__":
    main()
