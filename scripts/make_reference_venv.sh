#!/usr/bin/env bash
# Make the virtual environment YOLOv5's own scripts run in for the parity benchmarks (scripts/parity.py).
# The yolov5 package's train/val code needs NumPy < 2 and Pillow < 10, and a font it would otherwise download.
set -euo pipefail
venv=${REF_VENV:-.refvenv}
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$venv/bin/pip" install -q yolov5==7.0.14 'numpy<2' 'pillow<10' 'setuptools<81'
font=$(fc-match -f '%{file}' 'DejaVu Sans' 2>/dev/null || true)
[ -f "$font" ] || { apt-get install -y -q fonts-dejavu-core >/dev/null
                   font=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf; }
mkdir -p ~/.config/Ultralytics && cp "$font" ~/.config/Ultralytics/Arial.ttf
echo "YOLOv5 reference environment ready in $venv"
