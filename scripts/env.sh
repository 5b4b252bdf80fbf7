# Sourced by Kensa's scripts: where the heavy, cached things live.
# Everything heavy stays outside the clone, under $KENSA_CACHE.
export KENSA_CACHE="${KENSA_CACHE:-$HOME/.cache/kensa}"
export KENSA_VENV="$KENSA_CACHE/venv"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KENSA_CACHE/target}"
export LIBTORCH_USE_PYTORCH=1
export KENSA_TORCH_LIB="$KENSA_VENV/lib/python3.11/site-packages/torch/lib"
if [ -d "$KENSA_VENV/lib" ]; then
  tl=$(ls -d "$KENSA_VENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1)
  [ -n "$tl" ] && KENSA_TORCH_LIB="$tl"
fi
export PATH="$KENSA_VENV/bin:$KENSA_CACHE/tansu/bin:$PATH"
export LD_LIBRARY_PATH="$KENSA_TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KENSA_BACKBONE="${KENSA_BACKBONE:-$KENSA_CACHE/models/efficientnet-lite0.pt}"
export KENSA_BACKBONE_BF16="${KENSA_BACKBONE_BF16:-$KENSA_CACHE/models/efficientnet-lite0-bf16.pt}"
