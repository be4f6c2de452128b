#!/usr/bin/env bash
# Pretrain across several nodes. Run the same command on every node, changing NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash runs/multinode.sh --preset d26
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash runs/multinode.sh --preset d26
# Extra args go to `picochat pretrain`. PICOCHAT_BASE_DIR must be on a filesystem every node sees (checkpoints are
# written by all ranks into one folder). NCCL picks the interface; set NCCL_SOCKET_IFNAME if it picks the wrong one.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec .venv/bin/torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="${GPUS_PER_NODE:-8}" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RUN_ID:-picochat}" \
    -m picochat.train.pretrain "$@"
