#!/usr/bin/env bash
# A simulated cluster on one machine: N "nodes" as Linux network namespaces joined by veth pairs to a
# bridge (itself in its own namespace), addresses 10.200.0.1..N/24, real TCP between them. Each node is
# started by its own `deepspeed` launcher exactly as on a cluster (--hostfile --no_ssh --node_rank i).
# Everything is torn down on exit. Needs root (or CAP_NET_ADMIN) and iproute2.
#
#   launch/sim_cluster.sh NODES RANKS_PER_NODE dszo/train.py --config ... [overrides]
#   DSZO_SIM_DRY_RUN=1 launch/sim_cluster.sh 2 1 dszo/train.py ...   # print the commands only
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NODES RANKS_PER_NODE SCRIPT [ARGS...]" >&2
  exit 2
fi
NODES=$1; RANKS=$2; shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${DSZO_PYTHON:-$(command -v python3)}"
if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${DSZO_PYTHON:-}" ]; then PY="$ROOT/.venv/bin/python"; fi
DEEPSPEED="$(dirname "$PY")/deepspeed"
# The simulated nodes share this machine's cores: each rank gets cores / (nodes x ranks) threads unless
# OMP_NUM_THREADS says otherwise (a real node's launcher would give each of its ranks cores / ranks).
threads=$(( $(nproc) / (NODES * RANKS) )); export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
TAG="dszo$$"
PORT="${MASTER_PORT:-29600}"
WORK="$(mktemp -d)"
HOSTFILE="$WORK/hostfile"
for i in $(seq 0 $((NODES - 1))); do echo "node$i slots=$RANKS"; done > "$HOSTFILE"

run() { if [ -n "${DSZO_SIM_DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi; }

cleanup() {
  for i in $(seq 0 $((NODES - 1))); do ip netns del "$TAG-n$i" 2>/dev/null || true; done
  ip netns del "$TAG-br" 2>/dev/null || true
  rm -rf "$WORK"
}
if [ -z "${DSZO_SIM_DRY_RUN:-}" ]; then
  if ! ip netns add "$TAG-probe" 2>/dev/null; then
    echo "sim_cluster: cannot create network namespaces (needs root or CAP_NET_ADMIN, and iproute2)" >&2
    exit 3
  fi
  ip netns del "$TAG-probe"
  trap cleanup EXIT INT TERM
fi

run ip netns add "$TAG-br"
run ip -n "$TAG-br" link add br0 type bridge
run ip -n "$TAG-br" link set br0 up
for i in $(seq 0 $((NODES - 1))); do
  ns="$TAG-n$i"
  run ip netns add "$ns"
  run ip link add "v${TAG: -6}$i" netns "$ns" type veth peer name "b$i" netns "$TAG-br"
  run ip -n "$ns" link set "v${TAG: -6}$i" name eth0
  run ip -n "$ns" addr add "10.200.0.$((i + 1))/24" dev eth0
  run ip -n "$ns" link set eth0 up
  run ip -n "$ns" link set lo up
  run ip -n "$TAG-br" link set "b$i" master br0
  run ip -n "$TAG-br" link set "b$i" up
done

pids=()
for i in $(seq 0 $((NODES - 1))); do
  cmd=(ip netns exec "$TAG-n$i" env GLOO_SOCKET_IFNAME=eth0 DSZO_NODE_ADDR="10.200.0.$((i + 1))"
       "$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --node_rank "$i" --master_addr 10.200.0.1
       --master_port "$PORT" "$@")
  if [ -n "${DSZO_SIM_DRY_RUN:-}" ]; then echo "+ ${cmd[*]}"; continue; fi
  "${cmd[@]}" > "$WORK/node$i.log" 2>&1 &
  pids+=($!)
done
[ -n "${DSZO_SIM_DRY_RUN:-}" ] && exit 0

rc=0
for i in "${!pids[@]}"; do   # the first node's failure code, as a launcher reports it (dszo: 3 diverged, 143 stopped)
  code=0; wait "${pids[$i]}" || code=$?
  [ "$rc" -eq 0 ] && rc=$code
done
for i in $(seq 0 $((NODES - 1))); do
  echo "===== node $i ====="
  cat "$WORK/node$i.log"
done
exit $rc
