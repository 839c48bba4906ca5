"""The LightningModule: a YOLOv5 model trained with YOLOv5's recipe and validated with torchmetrics."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from tea_lightning.errors import ConfigError, NonFiniteLoss
from tea_lightning.metrics import DetectionMetrics, plot_curves
from tea_lightning.metrics.detection import CurveResult
from tea_lightning.model.anchors import fit_anchors
from tea_lightning.model.complexity import count_parameters, gflops
from tea_lightning.model.distillation import OutputDistillation
from tea_lightning.model.postprocess import non_max_suppression, unletterbox_boxes
from tea_lightning.model.recipe import ExponentialMovingAverage, Recipe, apply_schedule, build_optimizer, \
    warmup_iterations
from tea_lightning.model.weights import build_model, check_tea_checkpoint, inference_model, read_model, \
    read_weights, set_layer_memory_format, transfer_weights
from tea_lightning.pruning.callback import ChannelPruning, check_resumed_with_pruning
from tea_lightning.pruning.structure import StructureMismatch, resize_to_state_dict, with_classes_of
from tea_lightning.rundir import run_dir

log = logging.getLogger(__name__)

LOSS_NAMES = ("box_loss", "obj_loss", "cls_loss")


def fitness(map50: float, map50_95: float) -> float:
    """Return YOLOv5's model-selection score: 0.1 mAP50 + 0.9 mAP50-95."""
    return 0.1 * map50 + 0.9 * map50_95


def _check_nms_settings(hparams) -> None:
    """Raise ConfigError, naming the option, for a threshold outside [0, 1] or fewer than one detection kept (NMS
    would silently return nothing)."""
    for name in ("conf_thres", "iou_thres", "predict_conf_thres", "predict_iou_thres"):
        if not 0 <= hparams[name] <= 1:
            raise ConfigError(f"--model.{name} must lie between 0 and 1 (a confidence or an IoU), got {hparams[name]}.")
    if hparams.max_det < 1:
        raise ConfigError(f"--model.max_det must be at least 1 (detections kept per image), got {hparams.max_det}.")


class Detector(pl.LightningModule):
    """YOLOv5 detector with YOLOv5's training recipe and COCO-style validation.

    Args:
        model_cfg: a YOLOv5 model yaml: yolov5n.yaml, yolov5s.yaml, yolov5m.yaml (from the yolov5 package) or a path.
        nc: number of classes (linked from the data module by the CLI).
        names: class names (linked from the data module by the CLI).
        weights: weights that initialise the model: an official YOLOv5 `.pt` (every tensor whose name and shape
            match), a tea-lightning `.ckpt` or what `export-pt` wrote (pruned ones keep their architecture).
        img_size: training image size (linked from the data module); scales the objectness gain.
        batch_size: images per batch and process (linked from the data module); sets accumulation.
        recipe: optimisation and loss hyperparameters (YOLOv5 defaults).
        ema: keep YOLOv5's EMA of the weights for validation and checkpoints.
        conf_thres: confidence threshold of validation's NMS (YOLOv5's val.py: every box that could count towards
            mAP, with a box per class above the threshold).
        iou_thres: IoU threshold of validation's NMS.
        max_det: the most detections per image kept by NMS.
        predict_conf_thres: confidence threshold of prediction's NMS (YOLOv5's detect.py: the boxes worth drawing,
            one class per box).
        predict_iou_thres: IoU threshold of prediction's NMS.
        plots: write precision/recall/F1/PR curves after validate/test, and when fit ends those of the validation
            of the checkpoint best.ckpt holds.
        teacher: a checkpoint (.ckpt of ours or YOLOv5 .pt, with the same classes and anchors) to distil from while
            training, e.g. the unpruned model when fine-tuning its pruned copy; only used by `fit`.
        distill_weight: weight of the distillation loss against YOLOv5's loss (with `teacher`).
        channels_last: keep the weights and images in the channels-last (NHWC) memory layout, which the fast
            convolution kernels of CPUs (oneDNN) and of GPU tensor cores under mixed precision work in; False keeps
            PyTorch's default NCHW (results equal to rounding).
        autoanchor: at the start of a fit (not a resumed one) check the anchors against the training boxes and
            evolve new ones when fewer than 98% of the boxes could match one, as YOLOv5's train.py does (its
            --noautoanchor is autoanchor False).
    """

    def __init__(self, model_cfg: str = "yolov5n.yaml", nc: int = 80, names: list[str] | None = None,
                 weights: str | None = None, img_size: int = 640, batch_size: int = 16,
                 recipe: Recipe = Recipe(), ema: bool = True, conf_thres: float = 0.001,
                 iou_thres: float = 0.6, max_det: int = 300, predict_conf_thres: float = 0.25,
                 predict_iou_thres: float = 0.45, plots: bool = True, teacher: str | None = None,
                 distill_weight: float = 1.0, channels_last: bool = True, autoanchor: bool = True):
        super().__init__()
        if isinstance(recipe, dict):  # as checkpoints store it (and a library user may give it)
            try:
                recipe = Recipe(**recipe)
            except TypeError as err:
                raise ConfigError(f"recipe: {err}; the fields are those of tea_lightning.model.recipe.Recipe.") from None
        self.save_hyperparameters()
        # a plain dict: torch.load's default weights_only=True (Lightning's resume, load_from_checkpoint) refuses
        # a pickled Recipe object (the CLI stores it so; a Detector built in Python did not)
        self.hparams.recipe = recipe.as_dict()
        _check_nms_settings(self.hparams)
        self.recipe = recipe
        self.names = list(names) if names else [str(i) for i in range(nc)]
        if len(self.names) != nc:
            raise ConfigError(f"--model.names has {len(self.names)} entries but --model.nc is {nc}.")
        self.model = build_model(model_cfg, nc)
        # where the head's anchors were trained (a tea-lightning checkpoint): AutoAnchor and a teacher keep to them
        self.anchors_trained_in: str | None = None
        if weights:
            state, ours = read_weights(weights)
            if ours:  # our own checkpoint, pruned or not: take its architecture (the head: this data set's classes)
                self.anchors_trained_in = f"--model.weights {weights}"
                resize_to_state_dict(self.model, with_classes_of(self.model, state),
                                     source=f"--model.weights {weights}")
            else:
                self._take_pruned_architecture(state, weights)
            transferred, total = transfer_weights(self.model, state)
            rank_zero_info(f"Transferred {transferred}/{total} tensors from {weights}"
                           + ("" if transferred == total else " (the rest, e.g. a head for other classes, "
                                                              "keeps its fresh initialisation)"))
        self._attach_loss_hyperparameters()
        self.distillation = self._teacher(teacher, distill_weight) if teacher else None
        self.automatic_optimization = False  # YOLOv5's accumulation changes during warmup; see training_step
        self.metrics = DetectionMetrics(nc)
        # Per-image means of the evaluation losses over all processes' images, weighted as on one process (a plain
        # sync_dist mean would average the processes' means, which differ in image count).
        self.eval_losses = nn.ModuleDict({name: MeanMetric() for name in LOSS_NAMES})
        # Lightning's model summary at the start of a fit runs this through the model to print layer shapes and
        # FLOPs (without it the summary says "Total Flops: 0")
        self.example_input_array = torch.zeros(1, 3, img_size, img_size)
        self.last_optimizer_step = -1
        self.plot_paths: list[Path] = []
        self.best_curves = None  # (epoch, curves) of the validation best.ckpt holds, in fit
        self.validation_summary: dict[str, float] = {}  # the last validation's mAP, P/R/F1 and fitness
        self.apply_memory_format()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs) -> Detector:
        """Lightning's `load_from_checkpoint`, without the files the run started from: Lightning rebuilds the module
        from its saved arguments, which would read `weights` and `teacher` again (and fail once they have moved),
        although every tensor is in the checkpoint. Pass `teacher=...` to fit the loaded model with distillation."""
        kwargs.setdefault("weights", None)
        teacher = kwargs.pop("teacher", None)
        model = super().load_from_checkpoint(checkpoint_path, *args, teacher=None, **kwargs)
        # The head was trained with the checkpoint's anchors: a later fit keeps them, and a teacher must have them
        # too. It is attached only now, so that it is checked against the loaded head, not a fresh one.
        model.anchors_trained_in = f"the checkpoint {checkpoint_path}"
        if teacher:
            model.hparams.teacher = teacher
            model.distillation = model._teacher(teacher, model.hparams.distill_weight)
            model.apply_memory_format()
        return model

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Detector:
        """Return a checkpoint's model (pruned or not) on the CPU, for inference or export, after checking that the
        file is a tea-lightning checkpoint (an error names it otherwise)."""
        check_tea_checkpoint(path, "checkpoint")
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=False)

    def _take_pruned_architecture(self, state: dict[str, torch.Tensor], weights: str) -> None:
        """Narrow the model to a YOLOv5 .pt's layers where it is a pruned copy of it (export-pt of a pruned
        checkpoint, or a model pruned by torch-pruning's YOLOv5 example)."""
        try:
            narrowed = resize_to_state_dict(self.model, with_classes_of(self.model, state))
        except StructureMismatch:
            return  # not a pruned copy (e.g. weights of another model yaml): every tensor that fits transfers below
        if narrowed:
            rank_zero_info(f"{weights} is a pruned {Path(self.hparams.model_cfg).stem}: {narrowed} of its layers are "
                           "narrower than the yaml's, and the model takes their sizes")

    def _attach_loss_hyperparameters(self) -> None:
        head = self.model.model[-1]
        self.model.hyp = self.recipe.loss_hyperparameters(self.hparams.nc, head.nl, self.hparams.img_size)
        self._compute_loss = None  # built lazily on the right device

    def _teacher(self, path: str, weight: float) -> OutputDistillation:
        if weight <= 0:
            raise ConfigError(f"--model.distill_weight must be > 0 with --model.teacher, got {weight}.")
        teacher = read_model(path, "--model.teacher")
        ours, theirs = self.model.model[-1], teacher.model[-1]
        if (theirs.nc, theirs.nl, theirs.na) != (ours.nc, ours.nl, ours.na):
            raise ConfigError(f"--model.teacher {path} has a head for {theirs.nc} classes, {theirs.nl} layers of "
                              f"{theirs.na} anchors; this model's has {ours.nc} classes, {ours.nl} layers of {ours.na}"
                              " anchors: distil from a model trained on the same data set.")
        if not torch.equal(theirs.anchors.cpu(), ours.anchors.cpu()):  # e.g. the teacher's fit ran AutoAnchor
            if self.anchors_trained_in:
                raise ConfigError(f"--model.teacher {path} predicts with other anchors than those the head of "
                                  f"{self.anchors_trained_in} was trained with: distil from the model these weights "
                                  "come from, or one trained beside them.")
            # the outputs are compared anchor by anchor; a head not trained on this data set can take them
            ours.anchors.copy_(theirs.anchors.to(ours.anchors.device))
            rank_zero_info(f"The model takes the anchors of --model.teacher {path}, which distillation compares "
                           "its outputs with")
        rank_zero_info(f"Distilling from {path} ({count_parameters(teacher):,} parameters), weight {weight}")
        return OutputDistillation(teacher, weight)

    def apply_memory_format(self) -> None:
        """Put the model's weights in the chosen memory layout; called again wherever layers are rebuilt (pruning,
        loading a pruned checkpoint), since new tensors come in the default layout."""
        if not self.hparams.channels_last:
            return
        set_layer_memory_format(self.model, torch.channels_last)
        if self.distillation is not None:
            set_layer_memory_format(self.distillation.teacher, torch.channels_last)

    @property
    def compute_loss(self):
        """Return YOLOv5's ComputeLoss for the model as it is now (rebuilt after the model changes device)."""
        from yolov5.utils.loss import ComputeLoss

        if self._compute_loss is None or self._compute_loss.device != self.device:
            self._compute_loss = ComputeLoss(self.model)
        return self._compute_loss

    def configure_callbacks(self):
        """Return the EMA callback that is part of the recipe, in fit (elsewhere the checkpoint's weights are already
        the EMA's, and Lightning's WeightAveraging would only warn that it cannot restore its state)."""
        if not self.hparams.ema or self.trainer.state.fn != TrainerFn.FITTING:
            return []
        return [ExponentialMovingAverage(self.recipe.ema_decay, self.recipe.ema_tau)]

    def configure_optimizers(self):
        """Return SGD (or AdamW) over YOLOv5's parameter groups; the schedule is applied per batch."""
        return build_optimizer(self.model, self.recipe, self.hparams.batch_size, self.trainer.world_size)

    def forward(self, images: torch.Tensor):
        """Return the model's raw output for uint8 or float images in [0, 1]."""
        return self.model(self._model_input(images))

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Return images as floats in [0, 1] in the model's memory layout (converted while still uint8: cheaper)."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images.float() / 255 if images.dtype == torch.uint8 else images  # the data module delivers uint8

    def model_summary(self) -> dict:
        """Return the parameter count and GFLOPs at the training image size."""
        return {"model/params": count_parameters(self.model),
                "model/GFLOPs": gflops(self.model, self.hparams.img_size)}

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision.endswith("-true") and precision != "32-true":
            raise ConfigError(f"--trainer.precision {precision} is not supported: YOLOv5's model and loss are built "
                              "for float32 weights; use 16-mixed or bf16-mixed for speed, or 32-true.")
        self._check_data_settings(stage)
        # Lightning sets max_epochs to -1 when only --trainer.max_steps or max_time bound the run; YOLOv5's warmup
        # and LR decay are laid out over the epochs, and would run backwards.
        if stage == "fit" and self.trainer.max_epochs < 0:
            raise ConfigError("--trainer.max_epochs must be set for fit (YOLOv5's learning-rate schedule runs over "
                              f"a fixed number of epochs), got {self.trainer.max_epochs}; --trainer.max_steps and "
                              "--trainer.max_time may still stop the run earlier.")

    def _check_data_settings(self, stage: str) -> None:
        """Refuse a data module whose classes (always) or image and batch size (for fit: YOLOv5's loss gains and
        gradient accumulation follow them) differ from the model's. The CLI links them; a Detector built in Python
        kept its defaults (80 classes, 640, 16) without a word."""
        data = getattr(self.trainer, "datamodule", None)
        if data is None or not all(hasattr(data, key) for key in ("nc", "img_size", "batch_size")):
            return
        keys = ("nc", "img_size", "batch_size") if stage == "fit" else ("nc",)
        differ = [f"{key}={self.hparams[key]} (data: {getattr(data, key)})" for key in keys
                  if self.hparams[key] != getattr(data, key)]
        if differ:
            raise ConfigError(f"the Detector's {', '.join(differ)} differ from the data module's: build it with "
                              "Detector(..., nc=data.nc, names=data.names, img_size=data.img_size, "
                              "batch_size=data.batch_size) (the CLI links them).")

    def _fit_anchors(self) -> None:
        """YOLOv5's AutoAnchor for a new fit. Called when the fit starts: only then does Lightning know whether it
        resumes, and the EMA copy of the model, made earlier, starts again from new anchors."""
        data = getattr(self.trainer, "datamodule", None)
        if not hasattr(data, "split"):  # loaders given without our data module: no index of the training boxes
            return
        keep = ("the checkpoint's anchors (resumed fit)" if self.trainer.ckpt_path is not None else
                # distillation compares outputs anchor by anchor
                "the anchors of --model.teacher" if self.distillation is not None else
                # a new search would replace, by chance, anchors the head was trained with whenever they stay
                # under 98% recall
                f"the anchors its head was trained with ({self.anchors_trained_in})" if self.anchors_trained_in
                else None)
        if keep:
            rank_zero_info(f"AutoAnchor: skipped: the model keeps {keep}")
            return
        records = data.split("train").records  # on every process: a bad split stops them all, not rank 0 alone
        if fit_anchors(self.trainer, self.model, records, self.hparams.img_size, self.recipe.anchor_t):
            for callback in self.trainer.callbacks:
                if isinstance(callback, ExponentialMovingAverage):
                    callback.restart(self)

    def on_fit_start(self) -> None:
        if self.hparams.autoanchor:
            self._fit_anchors()
        if self.distillation is not None:  # not a submodule (see OutputDistillation): Lightning does not move it
            self.distillation.teacher.to(self.device)
        summary = self.model_summary()
        rank_zero_info(f"{Path(self.hparams.model_cfg).stem}: {summary['model/params']:,} parameters, "
                       f"{summary['model/GFLOPs']:.2f} GFLOPs at {self.hparams.img_size}")
        for logger in self.loggers:
            logger.log_hyperparams({**summary, "recipe": self.recipe.as_dict()})

    def on_train_epoch_start(self) -> None:
        # Lightning tells samplers the epoch (set_epoch); the training set's augmentation follows it too
        # (--data.augmentation.close_mosaic). From epoch 1 on this runs before the epoch's batches are drawn.
        set_epoch = getattr(getattr(self.trainer.train_dataloader, "dataset", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.current_epoch, self.trainer.max_epochs)
        # YOLOv5 drops the gradients of an epoch's last batches that did not make up a whole accumulation, so every
        # epoch starts from clean gradients. Lightning only clears them before a validation, and with
        # --trainer.check_val_every_n_epoch above 1 (or no validation) they carried into the next epoch's first step.
        self.optimizers().zero_grad()

    # ---- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Run one batch of YOLOv5's loop: schedule, forward, loss, backward and (every `accumulate`) a step."""
        optimizer = self.optimizers()
        batches = self.trainer.num_training_batches
        iteration = batch_idx + batches * self.current_epoch
        accumulate = apply_schedule(optimizer.optimizer, self.recipe, iteration, self.current_epoch,
                                    self.trainer.max_epochs, warmup_iterations(batches, self.recipe),
                                    self.hparams.batch_size, self.trainer.world_size)
        images = self._model_input(batch["images"])  # the distillation teacher sees the same tensor
        outputs = self(images)
        loss, items = self.compute_loss(outputs, batch["targets"])
        batch_size = len(images)
        if self.distillation is not None:
            distill = self.distillation.loss(images, outputs, self.model.hyp, self.compute_loss.balance)
            loss = loss + distill
            self.log("train/distill_loss", distill.detach() / batch_size, on_step=False, on_epoch=True,
                     prog_bar=True, batch_size=batch_size, sync_dist=True)
        self._stop_unless_finite(loss, batch, batch_idx)
        # YOLOv5's loss is a sum over the batch; DDP averages gradients, so scaling by the world size keeps the
        # step equal to one process with the whole batch.
        self.manual_backward(loss * self.trainer.world_size)
        if iteration - self.last_optimizer_step >= accumulate:
            optimizer.step()
            optimizer.zero_grad()
            self.last_optimizer_step = iteration
        for name, value in zip(LOSS_NAMES, items):  # synced once per epoch: the mean over every process's batches
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size,
                     sync_dist=True)
        self.log("train/lr", optimizer.optimizer.param_groups[1]["lr"], on_step=True, on_epoch=False,
                 batch_size=batch_size)
        return loss

    def _stop_unless_finite(self, loss: torch.Tensor, batch: dict, batch_idx: int) -> None:
        """Raise NonFiniteLoss, before the bad loss reaches the weights, if any process's loss is NaN or infinite."""
        # One flag reduced over all processes, so that every rank stops together instead of the others waiting
        # forever in the next gradient all-reduce; on one device it is a plain check.
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return
        last = run_dir(self.trainer) / "checkpoints" / "last.ckpt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint had been written yet"
        raise NonFiniteLoss(
            f"the training loss is not finite (this process: {loss.item():g}) at epoch {self.current_epoch}, batch "
            f"{batch_idx}, optimizer step {self.trainer.global_step}; this batch's images: "
            f"{', '.join(str(p) for p in batch['paths'])}. Training stopped before the weights changed and {kept}. "
            "Check those images' labels, lower --model.recipe.lr0 or use --trainer.precision 32-true, then resume "
            "with --ckpt_path.")

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this after unscaling mixed-precision gradients, the right moment to clip them.
        self.clip_gradients(optimizer, gradient_clip_val=self.recipe.grad_clip_norm, gradient_clip_algorithm="norm")

    # ---- evaluation -------------------------------------------------------------------------------------------
    def _detections(self, predictions: torch.Tensor, batch: dict, predicting: bool = False) -> list[torch.Tensor]:
        """Return the model's (B, N, 5 + nc) predictions after NMS (validation's or prediction's settings), per
        image in original-image pixels."""
        if predicting:
            detections = non_max_suppression(predictions, self.hparams.predict_conf_thres,
                                             self.hparams.predict_iou_thres, self.hparams.max_det, multi_label=False)
        else:
            detections = non_max_suppression(predictions, self.hparams.conf_thres, self.hparams.iou_thres,
                                             self.hparams.max_det)
        for i, det in enumerate(detections):
            det[:, :4] = unletterbox_boxes(det[:, :4], batch["ratios"][i], batch["pads"][i],
                                           batch["original_shapes"][i])
        return detections

    def _targets_in_original_pixels(self, batch: dict) -> list[dict]:
        height, width = batch["images"].shape[2:]
        targets = []
        for i in range(len(batch["images"])):
            t = batch["targets"][batch["targets"][:, 0] == i]
            boxes = t[:, 2:6] * torch.tensor([width, height, width, height], device=t.device)
            boxes = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)
            boxes = unletterbox_boxes(boxes, batch["ratios"][i], batch["pads"][i], batch["original_shapes"][i])
            targets.append({"boxes": boxes, "labels": t[:, 1].long()})
        return targets

    def _evaluation_step(self, batch: dict, stage: str) -> None:
        predictions, raw = self(batch["images"])
        # the loss also for a batch of background images, as YOLOv5 does (every DDP process logs the same names)
        loss_items = self.compute_loss([r.float() for r in raw], batch["targets"])[1]
        detections = self._detections(predictions, batch)
        preds = [{"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long()} for d in detections]
        self.metrics.update(preds, self._targets_in_original_pixels(batch))
        batch_size = len(batch["images"])
        for name, value in zip(LOSS_NAMES, loss_items):
            self.eval_losses[name].update(value, weight=batch_size)
            self.log(f"{stage}/{name}", self.eval_losses[name], on_step=False, on_epoch=True, batch_size=batch_size)

    def _evaluation_epoch_end(self, stage: str) -> None:
        results = self.metrics.compute()
        self.metrics.reset()
        summary = {key: float(results[key]) for key in ("mAP50", "mAP50-95", "precision", "recall", "f1")}
        summary["fitness"] = fitness(summary["mAP50"], summary["mAP50-95"])
        # YOLOv5's own AP (101-point, with its end point at recall 1) beside the COCO one: the numbers YOLOv5
        # users know, which differ from COCO's when recall stays low.
        summary["yolov5_mAP50"], summary["yolov5_mAP50-95"] = results["curves"].map50, results["curves"].map
        # Every process computed these over all processes' images (DetectionMetrics gathers them): averaging equal
        # values changes nothing and tells Lightning they are global.
        for key, value in summary.items():
            self.log(f"{stage}/{key}", value, prog_bar=key in ("mAP50", "mAP50-95"), sync_dist=True)
        if stage == "val":
            self.validation_summary = summary
        for name, ap50, ap in zip(self.names, results["ap50_per_class"], results["ap_per_class"]):
            self.log(f"{stage}/AP50/{name}", float(ap50), sync_dist=True)
            self.log(f"{stage}/AP50-95/{name}", float(ap), sync_dist=True)
        if not self.hparams.plots or self.trainer.sanity_checking:
            return
        if self.trainer.state.fn == "fit":
            self._keep_curves_if_best(results["curves"], summary["fitness"])
        elif self.trainer.is_global_zero:
            self._write_plots(results["curves"], stage)

    def _keep_curves_if_best(self, curves, score: float) -> None:
        """Keep this validation's curves when it will be best.ckpt (ModelCheckpoint keeps a strictly higher fitness,
        and ChannelPruning restarts it at a step), so that the fit ends with the plots of the checkpoint it names,
        however it ends (max_epochs, max_time, max_steps, early stopping)."""
        best = getattr(self.trainer.checkpoint_callback, "best_model_score", None)
        if best is None or score > float(best):
            self.best_curves = (self.current_epoch, curves)

    def on_train_end(self) -> None:
        if self.best_curves is not None and self.trainer.is_global_zero:
            epoch, curves = self.best_curves
            self._write_plots(curves, "val", f" (the best checkpoint's validation, epoch {epoch})")

    def _write_plots(self, curves, stage: str, which: str = "") -> None:
        out_dir = run_dir(self.trainer) / "plots" / stage
        self.plot_paths = plot_curves(curves, self.names, out_dir)
        rank_zero_info(f"Plots{which} written to {out_dir}")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B shows them as images in the run
                for path in self.plot_paths:
                    logger.log_image(key=f"{stage}/{path.stem}", images=[str(path)])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test")

    def on_predict_start(self) -> None:
        # Prediction runs the model as YOLOv5's detect.py deploys it, each BatchNorm folded into its convolution: the
        # same detections to rounding, a forward pass 14-21% faster on a CPU (docs/benchmarks.md). A copy, so the
        # module keeps its trainable form; set past nn.Module's attribute hook so that it never becomes a submodule.
        object.__setattr__(self, "_deployed", inference_model(self.model))

    def on_predict_end(self) -> None:
        object.__setattr__(self, "_deployed", None)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Return per image its path, original size and detections [x1, y1, x2, y2, conf, class] in pixels."""
        predictions = self._deployed(self._model_input(batch["images"]))[0]
        detections = self._detections(predictions, batch, predicting=True)
        return [{"path": path, "original_shape": tuple(int(v) for v in shape), "detections": det.cpu()}
                for path, shape, det in zip(batch["paths"], batch["original_shapes"], detections)]

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["last_optimizer_step"] = self.last_optimizer_step
        # what this checkpoint scored (best.ckpt is written right after its validation), for the end-of-fit summary
        checkpoint["validation_summary"] = self.validation_summary
        if self.best_curves is not None:  # so that a resumed fit still ends with the best checkpoint's plots
            epoch, curves = self.best_curves
            checkpoint["best_curves"] = {"epoch": epoch, "curves": curves.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A pruned checkpoint's tensors are smaller than the yaml's: take their architecture before Lightning
        # loads them, so that every pruned checkpoint reloads with no option beyond --ckpt_path.
        ckpt_path = self._trainer.ckpt_path if self._trainer is not None else None  # None: load_from_checkpoint
        resize_to_state_dict(self.model, checkpoint["state_dict"], prefix="model.",
                             source=f"--ckpt_path {ckpt_path}" if ckpt_path else "")
        self.apply_memory_format()
        self.last_optimizer_step = checkpoint.get("last_optimizer_step", -1)
        if "best_curves" in checkpoint:
            saved = checkpoint["best_curves"]
            self.best_curves = saved["epoch"], CurveResult.from_state_dict(saved["curves"])
        if self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING:  # the CLI checked it earlier
            check_resumed_with_pruning(checkpoint, any(isinstance(c, ChannelPruning) for c in self._trainer.callbacks),
                                       ckpt_path)
        if self._trainer is not None and self._trainer.state.fn != TrainerFn.FITTING and "callbacks" in checkpoint:
            # validate/test/predict leave the fit's checkpoint callbacks out on purpose (TeaCLI), and Lightning would
            # ask for them to be added; the callbacks of this run (ChannelPruning: is it pruned?) keep their state.
            present = {callback.state_key for callback in self._trainer.callbacks}
            checkpoint["callbacks"] = {key: state for key, state in checkpoint["callbacks"].items() if key in present}
