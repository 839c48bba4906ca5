"""Run by test_distributed.py: validate a checkpoint with 2 processes (gloo, CPU); rank 0 writes the metrics."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tea_lightning.cli import cli_main  # noqa: E402
from tests.conftest import FAST  # noqa: E402

if __name__ == "__main__":
    data, checkpoint, out = sys.argv[1:4]
    cli = cli_main(["validate", *FAST, "--data.data_yaml", data, "--data.batch_size", "2", "--ckpt_path", checkpoint,
                    "--trainer.default_root_dir", out, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp"])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    metrics["images"] = len(cli.trainer.val_dataloaders.sampler)  # this rank's share
    Path(out, f"metrics{cli.trainer.global_rank}.json").write_text(json.dumps(metrics))
