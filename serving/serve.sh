#!/usr/bin/env bash
# Start TF Serving on the published models: the tensorflow_model_server binary when it is on PATH,
# else the tensorflow/serving Docker image, else explain both and exit 1.
# Usage: serving/serve.sh MODELS_DIR   (MODELS_DIR = ARTIFACTS_DIR/models/mnist)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
models=${1:?usage: serve.sh MODELS_DIR}
GRPC_PORT=${GRPC_PORT:-8500}
REST_PORT=${REST_PORT:-8501}
# The TF Serving release that matches tensorflow-serving-api in pyproject.toml (and
# deploy/tf-serving.yaml); tags are X.Y.Z, and X.Y.Z-gpu for the GPU build.
TF_SERVING_IMAGE=${TF_SERVING_IMAGE:-tensorflow/serving:2.21.0}

if ! ls -d "$models"/[0-9]* >/dev/null 2>&1; then
  echo "error: no published version under $models: run 'make train' first" >&2
  exit 1
fi
models=$(cd "$models" && pwd)
# Batching is off unless BATCHING=1: see serving/batching.config for why.
batching=()
if [ "${BATCHING:-0}" = 1 ]; then batching=(--enable_batching); fi
# `python -m pipeline models promote/canary/rollback` writes models.config beside the models
# folder (labels stable/canary); without it the latest version is served.
generated=$(dirname "$models")/models.config
common=(--port="$GRPC_PORT" --rest_api_port="$REST_PORT" "${batching[@]}"
        --file_system_poll_wait_seconds=10 --model_config_file_poll_wait_seconds=10)

# The server reads a copy of the config with this machine's base_path ($1: the copy, $2: the
# base_path): `make models` may write another (--base-path for a cluster's mount). The copy is
# made from models.config when it exists, else from the static serving/models.config (the
# latest version), and refreshed every 2 s while the server runs, so labels set later (promote,
# canary, rollback, the first labels after a start without any, or their removal) reach the
# server at its next poll (10 s). The loop ends with the server: after `exec`, $$ is its pid.
sed_text() { printf '%s' "$1" | sed 's/[\\&#]/\\&/g'; }  # \ & # escaped for a replacement
rewrite() {
  local source="$here/models.config" tmp
  if [ -f "$generated" ]; then source="$generated"; fi
  tmp=$(mktemp "$1.XXXXXX") || return 1
  if ! sed "s#base_path: \"[^\"]*\"#base_path: \"$(sed_text "$2")\"#" "$source" > "$tmp"; then
    rm -f "$tmp"
    return 1
  fi
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}
follow_labels() {
  ( set +e
    while kill -0 $$ 2>/dev/null; do
      sleep 2
      rewrite "$1" "$2" || echo "serve.sh: could not refresh $1 from $generated" >&2
    done ) >/dev/null &
}
first_copy() {
  rewrite "$1" "$2" || { echo "error: could not write $1 (the server's config)" >&2; exit 1; }
}

if command -v tensorflow_model_server >/dev/null 2>&1; then
  config=$(dirname "$models")/models.local.config
  first_copy "$config" "$models"
  follow_labels "$config" "$models"
  echo "starting tensorflow_model_server on gRPC :$GRPC_PORT, REST :$REST_PORT ($models)"
  exec tensorflow_model_server --model_config_file="$config" \
    --monitoring_config_file="$here/monitoring.config" \
    --batching_parameters_file="$here/batching.config" "${common[@]}"
fi

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "starting $TF_SERVING_IMAGE in Docker on gRPC :$GRPC_PORT, REST :$REST_PORT ($models)"
  # The generated, label-driven config (if any) is mounted over the static one; its
  # base_path is rewritten to the container's /models/mnist.
  config_dir=$(mktemp -d)
  cp "$here"/*.config "$config_dir"/
  first_copy "$config_dir/models.config" /models/mnist
  follow_labels "$config_dir/models.config" /models/mnist
  exec docker run --rm -p "$GRPC_PORT:8500" -p "$REST_PORT:8501" \
    -v "$models:/models/mnist:ro" -v "$config_dir:/config:ro" "$TF_SERVING_IMAGE" \
    --model_config_file=/config/models.config \
    --monitoring_config_file=/config/monitoring.config \
    --batching_parameters_file=/config/batching.config \
    --port=8500 --rest_api_port=8501 "${batching[@]}" --file_system_poll_wait_seconds=10 \
    --model_config_file_poll_wait_seconds=10
fi

cat >&2 <<MSG
error: neither tensorflow_model_server nor a running Docker engine was found. Either:
  1. install the binary (Debian/Ubuntu, see https://www.tensorflow.org/tfx/serving/setup):
       apt-get install tensorflow-model-server     # from TF Serving's apt repository
     then run 'make serve' again; or
  2. install and start Docker, then run 'make serve' again: it runs $TF_SERVING_IMAGE
     with the labels 'make models' set (stable, canary) and the monitoring config.
MSG
exit 1
