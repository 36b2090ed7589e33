#!/usr/bin/env bash
# EAGLE on a Cloud TPU VM slice: the same launch/train.py, one process per host.
#
#   TPU_NAME=eagle-v5e-16 ZONE=us-west4-a PROJECT=my-project WORKDIR=/mnt/runs/ml25m \
#   DATA=/mnt/data/ml-25m ENV_URL=http://10.0.0.2:8000 ENV_MODEL=Qwen/Qwen2.5-7B-Instruct \
#   bash launch/tpu_vm.sh
#
# WORKDIR and DATA must be a folder every host sees (a mounted persistent disk or a gcsfuse mount of
# a bucket): orbax writes the checkpoints there and every host resumes from it. ENV_URL is an
# OpenAI-compatible server of the environment LLM (vLLM / JetStream / launch.serve_env) and
# ENV_MODEL the name it serves the model under (its /v1/models id).
# Before the real run, validate the config on the VM without data or models:
#   python -m launch.train --config=configs/movielens_25m.py --dry_run
# and build the world once (WALS, E_D, anchors, actions) from worker 0:
#   python -m launch.train --config=configs/movielens_25m.py --workdir=$WORKDIR --prepare_only ...
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${PROJECT:?}" "${WORKDIR:?}" "${DATA:?}" "${ENV_URL:?}" "${ENV_MODEL:?}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all \
  --command="set -e
    [ -d eagle_jax ] || git clone '$REPO_URL' eagle_jax
    cd eagle_jax && git pull --ff-only
    python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'
    .venv/bin/python -m launch.train --config=configs/movielens_25m.py --workdir='$WORKDIR' \
      --config.wals.data.source='$DATA' --config.llm.server_url='$ENV_URL' \
      --config.llm.served_model='$ENV_MODEL' \
      --config.distributed=True 2>&1 | tee -a \$HOME/eagle_train.log"
