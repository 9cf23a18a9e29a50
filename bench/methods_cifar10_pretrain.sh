#!/bin/bash
# bench/methods.py (issue 31): pretraining arms of bench/results/methods_cifar10_cpu.json: same preset, seed, time budget; one at a time
# under the shared lock (released between arms).
cd /work/wt/i31-family
COMMON="--config configs/cifar10_cpu.yaml --train_shards /tmp/i31/data/train --epochs 1 --warmup_epochs 0.1 --max_train_minutes 8 --eval_every_epochs null --tracker none --progress false --log_every 20 --checkpoint_every null --overwrite true --seed 0"
for arm in simclr supcon simclrv2; do
  case $arm in
    simclr) extra="--loss ntxent --model.proj_layers 2";;
    supcon) extra="--loss supcon --model.proj_layers 2";;
    simclrv2) extra="--loss ntxent --model.proj_layers 3";;
  esac
  echo "=== $arm start $(date -u +%FT%TZ)"
  flock /work/wt/heavy.lock nice -n 0 .venv/bin/python train.py $COMMON $extra --output_dir /tmp/i31/runs/$arm > /tmp/i31/runs/$arm.log 2>&1
  echo "=== $arm rc $? end $(date -u +%FT%TZ)"
done
