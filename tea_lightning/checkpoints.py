"""Checkpoints that survive the machine: written atomically, and one written when a run is interrupted."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from tea_lightning.errors import CheckpointWriteError, ConfigError
from tea_lightning.rundir import run_dir


_UMASK = os.umask(0)
os.umask(_UMASK)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own folder and renames it into place.

    Lightning's writer stages the file in the system temp folder and moves it, which copies in place (not
    atomically) when that folder is on another file system, so a full disk or a kill during the copy could leave a
    truncated `last.ckpt`. A rename within one folder either happens whole or not at all.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        path = Path(path)
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial",
                                             delete=False) as f:
                temporary = Path(f.name)
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temporary, 0o666 & ~_UMASK)  # temporary files are private (0600); checkpoints are not
            os.replace(temporary, path)
        except BaseException as err:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            # torch.save's zip writer reports a failed write (a full disk) as a RuntimeError raised while handling
            # the OSError
            os_error = err if isinstance(err, OSError) else err.__context__
            if not isinstance(os_error, OSError):
                raise
            raise CheckpointWriteError(
                f"could not write checkpoint {path}: {os_error.strerror or os_error}. Checkpoints written before it "
                f"in {path.parent} are intact. Free disk space or give a writable --trainer.default_root_dir, then "
                "resume with --ckpt_path and the newest checkpoint there.") from err


class _ModelCheckpointState(ModelCheckpoint):
    """A ModelCheckpoint whose state keeps ModelCheckpoint's key in checkpoints, so that checkpoints written before
    the subclass existed still restore it on resume."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)


class LastCheckpoint(_ModelCheckpointState):
    """`last.ckpt` after every epoch. (Lightning 2.6's `save_last=True` writes it only with a new best.)

    Lightning also skips a save when no optimizer step was made since the last one, and an epoch shorter than
    YOLOv5's gradient accumulation (a small data set: 16 images in batches of 4 step once every 4 epochs at the
    nominal batch of 64) makes none, so last.ckpt lagged behind by epochs; here a new epoch is always saved.
    """

    def __init__(self):
        super().__init__(filename="last", enable_version_counter=False)
        self._epoch_saved: int | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        # a fit resumed into another folder (CSVLogger) starts its own last.ckpt: nothing to restore, and Lightning
        # would warn that its state is not reloaded
        if self.dirpath is None or state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)

    def _should_skip_saving_checkpoint(self, trainer) -> bool:
        step_saved = self._last_global_step_saved
        if self._epoch_saved != trainer.current_epoch:
            self._last_global_step_saved = -1  # Lightning's test for "saved at this step already" (private API)
        try:
            return super()._should_skip_saving_checkpoint(trainer)
        finally:
            self._last_global_step_saved = step_saved

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._epoch_saved = trainer.current_epoch


class BestCheckpoint(_ModelCheckpointState):
    """`best.ckpt`: the checkpoint of the highest validation fitness (YOLOv5's), which also survives a resume into
    another folder.

    CSVLogger (and TensorBoard) give a resumed fit a new version folder, and Lightning restores a ModelCheckpoint's
    best score only when its folder is unchanged: the first epoch after the resume then became best.ckpt however it
    scored. Here the score is kept and the best.ckpt of the run being continued is copied into the new folder, which
    so holds the best of the whole run.
    """

    def __init__(self):
        super().__init__(monitor="val/fitness", mode="max", filename="best", auto_insert_metric_name=False,
                         enable_version_counter=False)
        self._carried: tuple[Path, Path] | None = None  # (the earlier best.ckpt, its copy here) until copied

    def load_state_dict(self, state_dict: dict) -> None:
        earlier = Path(state_dict.get("best_model_path") or "")
        moved = self.dirpath is not None and state_dict.get("dirpath", self.dirpath) != self.dirpath
        if not moved or state_dict.get("best_model_score") is None or not earlier.is_file():
            super().load_state_dict(state_dict)
            return
        here = os.path.join(self.dirpath, earlier.name)
        self.best_model_score, self.kth_value = state_dict["best_model_score"], state_dict["kth_value"]
        self.best_model_path = self.kth_best_model_path = here
        self.best_k_models = {here: self.best_model_score}
        self._carried = earlier, Path(here)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self._carried is None:
            return
        earlier, here = self._carried
        if trainer.is_global_zero:
            here.parent.mkdir(parents=True, exist_ok=True)
            partial = here.with_name(f".{here.name}.partial")
            shutil.copyfile(earlier, partial)
            os.replace(partial, here)
            print(f"The resumed run writes to {here.parent}; the best checkpoint so far ({earlier}) is copied there "
                  "and stays best.ckpt until an epoch beats it.", flush=True)
        trainer.strategy.barrier()
        self._carried = None


def resume_command(checkpoint: Path) -> str:
    """Return how to continue this run from `checkpoint`: the same `fit` command line with a new --ckpt_path; for
    a sweep, the sweep again (it resumes by itself); for a fit inside another command (demo), a fit of the
    configuration saved in the run folder."""
    if sys.argv[1:2] == ["sweep"]:
        return f"{shlex.join(['tea-lightning', *sys.argv[1:]])} (it resumes from {checkpoint})"
    if sys.argv[1:2] != ["fit"]:
        return shlex.join(["tea-lightning", "fit", "--config", str(checkpoint.parent.parent / "config.yaml"),
                           "--ckpt_path", str(checkpoint)])
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    return shlex.join(["tea-lightning", *args, "--ckpt_path", str(checkpoint)])


class SaveOnInterrupt(Checkpoint):
    """On SIGTERM (preemption, `kill`, SLURM's time limit) or Ctrl+C during `fit`, stops before the next training
    batch and writes `last.ckpt` of the run as it stands, so that `fit --ckpt_path last.ckpt` continues there.

    The signal handler only records the signal; whether to stop is decided at the start of every training batch by
    one flag reduced over all processes, so under DDP every rank stops at the same batch and writes the checkpoint
    together, whichever of them was signalled. Lightning 2.6's own SIGTERM handler broadcasts from inside the
    handler, which deadlocks a 2-process run killed during training (Lightning issue #20806; seen here), so it is
    replaced while training runs. Under SLURM with Lightning's auto-requeue (the default), SLURM's warning signal
    before the time limit (SIGUSR1 with `#SBATCH --signal=SIGUSR1@120`) is handled the same way, for the same reason
    (Lightning's handler saves from inside the handler): all processes stop at one batch, the checkpoint goes where
    Lightning looks when the requeued job starts (`<default_root_dir>/hpc_ckpt_<n>.ckpt`), and rank 0 requeues the
    job with `scontrol requeue`; under SLURM a SIGTERM (a preemption) also saves there, for SLURM's own requeue. A
    second Ctrl+C (0.5 s or more after the first) stops at once, without a checkpoint. Lightning's own
    OnExceptionCheckpoint saves on any error (also a broken config before training) and deletes its file when a later
    run ends; here only interruptions count and the file is the one users resume from.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_SECONDS = 0.5  # a second Ctrl+C sooner than this is the first one delivered again, not a person's

    def __init__(self):
        self._received: int | None = None  # the signal this process got, until the run stops
        self._received_at = 0.0  # when (time.monotonic())
        self._stopping = False  # all processes agreed to stop at this batch boundary
        self._previous_handlers: dict = {}
        self._requeue_signal: int | None = None  # SLURM's, when Lightning would requeue the job
        self._requeue = False  # all processes agreed that this stop is SLURM's (any of them got its signal)

    def state_dict(self) -> dict:
        # the SLURM job that wrote the checkpoint: a job resumes another's hpc_ckpt only when asked (see TeaCLI)
        return {"slurm_job_id": os.environ.get("SLURM_JOB_ID")}

    def on_train_start(self, trainer, pl_module) -> None:
        self._received, self._stopping, self._requeue = None, False, False
        environment = trainer._accelerator_connector.cluster_environment  # the one Lightning's handlers consult
        self._requeue_signal = environment.requeue_signal if isinstance(environment, SLURMEnvironment) \
            and environment.auto_requeue else None
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            signals = [*self._SIGNALS, *([self._requeue_signal] if self._requeue_signal else [])]
            self._previous_handlers = {signum: signal.getsignal(signum) for signum in signals}
            for signum in signals:
                signal.signal(signum, self._record)

    def _record(self, signum: int, frame) -> None:
        if self._received is not None and signum == signal.SIGINT:
            if time.monotonic() - self._received_at < self.REPEAT_SECONDS:
                return  # one Ctrl+C delivered twice: `timeout -s INT` signals the process, then its whole group
            raise KeyboardInterrupt  # asked twice: stop now
        self._received, self._received_at = signum, time.monotonic()
        then = {self._requeue_signal: " (then requeueing the SLURM job)",
                signal.SIGINT: " (Ctrl+C again to stop at once, without saving)"}.get(signum, "")
        print(f"\n{signal.Signals(signum).name} received: stopping after this batch and saving the run{then}.",
              file=sys.stderr, flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_if_signalled(trainer)  # a signal during the last validation still ends in a stop
        self._restore_handlers()

    def _stop_if_signalled(self, trainer) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._received is not None, all=False):
            return
        self._stopping = True
        # the kind of stop must agree too, whichever process got which signal
        self._requeue = self._requeue_signal is not None and trainer.strategy.reduce_boolean_decision(
            self._received == self._requeue_signal, all=False)
        raise KeyboardInterrupt if self._received == signal.SIGINT else SIGTERMException

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        if trainer.state.fn != "fit" or not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        if not self._stopping:
            return  # a second Ctrl+C, mid-batch: the weights may be half updated, and other processes cannot join
        if self._requeue:
            self._save_and_requeue(trainer)
            return
        if self._requeue_signal is not None and isinstance(exception, SIGTERMException):
            self._save_for_slurm_requeue(trainer)
            return
        path = run_dir(trainer) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        cause = "Ctrl+C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        _tell(trainer, f"Interrupted by {cause} at epoch {trainer.current_epoch}, after {batches} "
                       f"batch{'' if batches == 1 else 'es'} of it: the run so far is saved in {path}. Continue it "
                       f"with:\n  {resume_command(path)}")

    def _save_hpc_checkpoint(self, trainer) -> Path:
        # the path (a private Lightning helper) is that of Lightning's own handler: where the requeued job (the same
        # command) looks for a checkpoint to resume
        path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        trainer.save_checkpoint(path, weights_only=False)
        return path

    def _save_for_slurm_requeue(self, trainer) -> None:
        """SIGTERM under SLURM: a preemption (or scancel). With `#SBATCH --requeue` SLURM reruns the job's script,
        without --ckpt_path: the hpc checkpoint lets that rerun resume instead of training again from scratch in the
        same run folder."""
        path = self._save_hpc_checkpoint(trainer)
        _tell(trainer, f"Interrupted by SIGTERM at epoch {trainer.current_epoch} (SLURM job "
                       f"{os.environ.get('SLURM_JOB_ID')}): the run so far is saved in {path}. If SLURM requeues the "
                       f"job, it resumes from there by itself; otherwise continue it with:\n  {resume_command(path)}")

    def _save_and_requeue(self, trainer) -> None:
        path = self._save_hpc_checkpoint(trainer)
        if not trainer.is_global_zero:
            return
        job = os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        try:
            requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        except FileNotFoundError:
            requeued = None
        if requeued is not None and requeued.returncode == 0:
            _tell(trainer, f"SLURM's time-limit signal at epoch {trainer.current_epoch}: the run is saved in {path} "
                           f"and job {job} is requeued; it resumes from there by itself.")
        else:
            reason = "scontrol was not found" if requeued is None else requeued.stderr.strip() or requeued.returncode
            _tell(trainer, f"SLURM's time-limit signal: the run is saved in {path}, but `scontrol requeue {job}` "
                           f"failed ({reason}). Continue it in a new job with:\n  {resume_command(path)}")

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


def check_slurm_resume(root: Path) -> None:
    """Raise ConfigError when, under SLURM, a fit without --ckpt_path would resume an hpc checkpoint in `root` that
    another SLURM job wrote.

    Lightning resumes the newest `hpc_ckpt_<n>.ckpt` of the root folder whenever it runs under SLURM, so that a
    requeued job continues itself; a new job in the same folder would continue the old job's run (its model, its
    epoch) under its own name. Checkpoints that do not say which job wrote them are left to Lightning.
    """
    if not SLURMEnvironment.detect():
        return
    found = [(int(p.stem.rpartition("_")[2]), p) for p in root.glob("hpc_ckpt_*.ckpt")
             if p.stem.rpartition("_")[2].isdigit()]
    if not found:
        return
    newest = max(found)[1]
    saved = torch.load(newest, map_location="cpu", weights_only=False, mmap=True)
    writer = saved.get("callbacks", {}).get(SaveOnInterrupt.__qualname__, {}).get("slurm_job_id")
    job = os.environ.get("SLURM_JOB_ID")
    if writer is None or writer == job:
        return
    raise ConfigError(
        f"--trainer.default_root_dir {root} holds {newest.name}, which SLURM job {writer} saved to resume later, and "
        f"under SLURM Lightning would continue that run in this job ({job}) instead of starting this one. To "
        f"continue it, pass --ckpt_path {newest}; for a new run, give this job its own --trainer.default_root_dir "
        "(scripts/slurm_fit.sh uses runs/slurm/<job id>) or move the file away.")


def _tell(trainer, message: str) -> None:
    """Print what happened to the run and what to do, once (rank 0), as plain text: a warning would print this
    module's file and line before it."""
    if trainer.is_global_zero:
        print(message, file=sys.stderr, flush=True)
