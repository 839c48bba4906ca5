"""tea-lightning: YOLOv5 detectors trained, validated and pruned with PyTorch Lightning."""
