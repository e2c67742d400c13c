#!/usr/bin/env bash
# Runs `lmp train` under SLURM: one `accelerate launch` per node, preemption-safe.
#
#   launch.sh RECIPE [lmp train options...]
#
# Called by the sbatch scripts beside it. The job must be submitted with --signal=USR1@<secs>
# (time limit) and --requeue: every training process gets SIGUSR1 (or SIGTERM on preemption),
# finishes its step, saves a checkpoint and exits; then this script requeues the job, and the
# requeued job resumes from that checkpoint because `lmp train` resumes any run folder that holds
# checkpoints. The launchers ignore SIGUSR1 so that only the training processes act on it.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: launch.sh RECIPE [lmp train options...]" >&2
  exit 2
fi
recipe=$1
shift

nodes=${SLURM_NNODES:-1}
gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
num_processes=$((nodes * gpus_per_node))
main_host=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM job}" | head -n 1)
port=${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

# the run folder, to read how training ended, resolved by lmp from the same arguments
run_dir=$(lmp train "$recipe" "$@" --print-run-dir)

launch_opts=(--num_machines "$nodes" --num_processes "$num_processes"
  --main_process_ip "$main_host" --main_process_port "$port")
if ((num_processes > 1)); then launch_opts+=(--multi_gpu); fi

echo "lmp: $nodes node(s) x $gpus_per_node process(es), main $main_host:$port, run $run_dir"
# SLURM_NODEID is expanded on each node by the inner shell, giving every launcher its rank
# shellcheck disable=SC2016
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
  'trap "" USR1; exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' _ \
  "${launch_opts[@]}" -m lm_pretrain.cli train "$recipe" "$@" || true

state=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["state"])' \
  "$run_dir/status.json" 2>/dev/null || echo unknown)
echo "lmp: training state: $state"
case $state in
  finished) exit 0 ;;
  stopped)
    echo "lmp: stopped by a signal after a checkpoint; requeueing job ${SLURM_JOB_ID:-?}"
    scontrol requeue "${SLURM_JOB_ID:?}"
    exit 0
    ;;
  *) exit 1 ;;
esac
