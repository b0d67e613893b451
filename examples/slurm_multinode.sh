#!/bin/bash
# BYOL pretraining on several machines with SLURM: one torchrun launcher per node, one
# training process per GPU, the nodes meeting at a c10d rendezvous on the first node.
#
#   sbatch examples/slurm_multinode.sh               # a new run, or the next leg of one
#   DATA=/shared/images OUT=/shared/runs/byol sbatch examples/slurm_multinode.sh
#
# What every node must see:
#   * OUT, the run folder, on a file system all nodes share (NFS, Lustre, GPFS, ...).
#     Global rank 0 writes last.pt and metrics.jsonl there, and on resume EVERY process
#     reads last.pt: rank 0 may land on another node in the next job, since torchrun's
#     rendezvous hands out node ranks. A node-local --out cannot be resumed from; the run
#     then stops on every node with one line saying so ("... must be on a file system
#     they all share").
#   * DATA, readable on every node, with the same files: a shared folder, or identical
#     copies on each node's disk (each process lists the folder and takes its share).
#
# Resume: the job adds --resume when OUT/last.pt exists, so submitting the same script
# again (after a time-out, a preemption or a failed node) continues the run. With the same
# number of processes it continues exactly where it stopped (same data order and random
# generators: on CPUs the weights equal an uninterrupted run's, on GPUs up to cuDNN's
# non-deterministic kernels); another count still resumes, with
# a warning, on a different data order.
#
# Stopping: SLURM's SIGTERM (preemption, scancel, or --signal below before the time limit)
# reaches torchrun, which passes it to its processes and waits 30 s for them: they finish
# the step, save OUT/last.pt and exit 143.

#SBATCH --job-name=byol
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64           # image decoding: --workers loader processes per GPU process
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300            # SIGTERM 5 minutes before the time limit: save and stop
#SBATCH --open-mode=append
#SBATCH --output=byol-%j.log

set -euo pipefail

DATA=${DATA:-/shared/datasets/imagenet/train}   # readable on every node
OUT=${OUT:-/shared/runs/byol-resnet50}          # on a shared file system
GPUS=${SLURM_GPUS_ON_NODE:-8}                    # processes per node
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

RESUME=""
if [ -f "$OUT/last.pt" ]; then
    RESUME="--resume"  # decided once, here, so every node gets the same command
fi

# srun starts the launchers (one per node, --ntasks-per-node=1); --kill-on-bad-exit stops
# the other nodes when one fails. The flags after `train` are the run's recipe; a resumed
# run keeps the checkpoint's (the same flags are fine, a different value is an error).
srun --kill-on-bad-exit=1 \
    python -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" \
    --nproc-per-node "$GPUS" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:29500" \
    --rdzv-id "$SLURM_JOB_ID" \
    -m byol_pytorch train \
    --data "$DATA" \
    --out "$OUT" \
    --model resnet50 \
    --recipe paper \
    --batch-size 4096 \
    --epochs 300 \
    --workers 8 \
    $RESUME
