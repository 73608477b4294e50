#!/usr/bin/env bash
# Multi-process training on this machine through torchrun (one process per GPU, or per CPU slot).
#
#   launch/local.sh NPROC CONFIG [dotted.key=value ...] [--resume auto|PATH]
#   launch/local.sh 2 configs/demo.yaml parallel.ep_size=2 train.steps=200
#
# Equivalent to `moevit train CONFIG ... --nproc NPROC`, which re-launches itself the same way.
# MASTER_PORT picks the rendezvous port (default: a free one, via --standalone).
# PYTHON picks the interpreter (default: python on PATH, e.g. the project's .venv).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 NPROC CONFIG [dotted.key=value ...] [--resume auto|PATH]" >&2
    exit 2
fi
nproc="$1"
shift

rendezvous=(--standalone)
if [[ -n "${MASTER_PORT:-}" ]]; then
    rendezvous=(--master-addr 127.0.0.1 --master-port "$MASTER_PORT")
fi

exec "${PYTHON:-python}" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node "$nproc" \
    -m moevit.cli train "$@"
