#!/usr/bin/env bash
# The peer row's own environment: optimum-intel (what a CPU user of OpenVINO picks) pins transformers < 5.6 and
# slimsd runs a newer one, so the peer gets its own virtualenv instead of bending slimsd's. torch, openvino and
# numpy are not downloaded again: a .pth file puts slimsd's site-packages AFTER the peer's own on sys.path, so
# the peer's transformers / optimum / diffusers win and the big wheels are shared (same OpenVINO build as ours).
# Usage: bash benchmarks/make_peer_env.sh [BASE_VENV] [PEER_VENV]
set -euo pipefail
BASE=${1:-.venv}
PEER=${2:-benchmarks/.peer-venv}
BASE_SITE=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$BASE/bin/python" -m venv "$PEER"  # the same Python as slimsd (its wheels are shared)
PEER_SITE=$("$PEER/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$BASE_SITE" > "$PEER_SITE/zz_slimsd_base.pth"
"$PEER/bin/python" -m pip install -q --upgrade pip
# optimum-intel's own requirements, minus torchvision (which would pull a second, CUDA, torch); then
# optimum-intel itself without dependencies. openvino-tokenizers must match slimsd's openvino.
OV=$("$BASE/bin/python" -c 'import openvino; print(openvino.__version__.split("-")[0])')
"$PEER/bin/python" -m pip install -q "transformers>=4.51,<5.6" "optimum~=2.3.0" "huggingface-hub>=0.23.2,<1.22" \
  "requests>=2.33,<3" "openvino-tokenizers~=${OV%.*}.0" "diffusers"  # a diffusers that takes that hub
"$PEER/bin/python" -m pip install -q --no-deps "optimum-intel==2.2.0"
"$PEER/bin/python" -c 'import optimum.intel, transformers, openvino; print("peer env:", "optimum-intel", optimum.intel.__version__ if hasattr(optimum.intel, "__version__") else "?", "transformers", transformers.__version__, "openvino", openvino.__version__)'
