#!/usr/bin/env bash
# EAGLE on a Cloud TPU VM slice (v5e-8: one host; v4-16: two hosts), end to end:
#   1. install on every worker;  2. the environment LLM server;  3. dry run (no data, no models);
#   4. the world, built once on worker 0;  5. training on every worker (one process per host,
#   jax.distributed detects the slice);  6. evaluation from the orbax checkpoints.
#
#   TPU_NAME=eagle-v4-16 ZONE=us-central2-b PROJECT=my-project WORKDIR=gs://my-bucket/runs/ml25m \
#   DATA=/mnt/data/ml-25m ENV_MODEL=Qwen/Qwen2.5-7B-Instruct bash launch/tpu_vm.sh [STEP ...]
#
# STEP: any of install server dry_run prepare train evaluate (default: all, in that order).
# WORKDIR: a gs:// bucket folder (etils.epath + orbax write it directly; install adds the gcs
#   extra) or a folder every host mounts. DATA: MovieLens-25M's ratings on every host.
# ENV_URL: an OpenAI-compatible server of the environment LLM that already runs (vLLM, JetStream,
#   a hosted endpoint); without it, step `server` starts vLLM on SERVER_HOST (default: worker 0's
#   internal IP, port 8000) serving ENV_MODEL under that name (`--config.llm.served_model`).
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${PROJECT:?}" "${WORKDIR:?}" "${DATA:?}" "${ENV_MODEL:?}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
CONFIG="${CONFIG:-configs/movielens_25m.py}"
STEPS=("${@:-install server dry_run prepare train evaluate}")
STEPS=(${STEPS[*]})

ssh_tpu() {  # ssh_tpu WORKER COMMAND
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker="$1" \
    --command="$2"
}

if [ -z "${ENV_URL:-}" ]; then
  SERVER_HOST="${SERVER_HOST:-$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
    --project="$PROJECT" --format='value(networkEndpoints[0].ipAddress)')}"
  ENV_URL="http://$SERVER_HOST:8000"
fi
RUN="cd eagle_jax && .venv/bin/python -m launch"
FLAGS="--config=$CONFIG --workdir='$WORKDIR' --config.wals.data.source='$DATA' \
  --config.llm.server_url='$ENV_URL' --config.llm.served_model='$ENV_MODEL'"

for step in "${STEPS[@]}"; do
  echo "== $step"
  case "$step" in
    install)
      ssh_tpu all "set -e
        [ -d eagle_jax ] || git clone '$REPO_URL' eagle_jax
        cd eagle_jax && git pull --ff-only
        python3 -m venv .venv && .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]'" ;;
    server)
      # The environment LLM: vLLM's OpenAI-compatible server (served model name = ENV_MODEL). A
      # GPU or TPU host of its own is the usual choice; worker 0 serves it here for completeness.
      ssh_tpu 0 "set -e
        python3 -m venv vllm-env && vllm-env/bin/pip install -q vllm
        nohup vllm-env/bin/vllm serve '$ENV_MODEL' --served-model-name '$ENV_MODEL' --port 8000 \
          > vllm.log 2>&1 &
        until curl -sf '$ENV_URL/v1/models' | grep -q '$ENV_MODEL'; do sleep 10; done" ;;
    dry_run)  # shapes, shardings, memory per device and FLOPs of the compiled step; no data read
      ssh_tpu 0 "$RUN.train --config=$CONFIG --dry_run" ;;
    prepare)  # WALS, E_D, anchors, profiles and candidate actions, once, on one process
      ssh_tpu 0 "$RUN.train $FLAGS --prepare_only 2>&1 | tee -a \$HOME/eagle_prepare.log" ;;
    train)  # every host: one process each; resumes from the newest checkpoint when rerun
      ssh_tpu all "$RUN.train $FLAGS --config.distributed=True 2>&1 | tee -a \$HOME/eagle_train.log" ;;
    evaluate)  # every host restores the agents; process 0 writes <workdir>/eval/report.json
      ssh_tpu all "$RUN.evaluate $FLAGS --config.distributed=True 2>&1 | tee -a \$HOME/eagle_eval.log" ;;
    *) echo "unknown step $step (install server dry_run prepare train evaluate)" >&2; exit 2 ;;
  esac
done
