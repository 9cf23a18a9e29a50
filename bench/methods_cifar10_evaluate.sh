#!/bin/bash
# Evaluations of bench/results/methods_cifar10_cpu.json, in three holds of the shared lock (<= ~15 min each).
cd /work/wt/i31-family
export R=/tmp/i31/runs
export TRAIN5="/tmp/i31/data/train/train-{000000..000004}.tar"   # 5,000 train images: kNN index / linear train set
export VAL5="/tmp/i31/data/test/test-{000000..000004}.tar"        # 5,000 test images: every score
export ALLTRAIN=/tmp/i31/data/train                                # the 1% / 10% label subsets are drawn from all 50,000
ev() {  # arm name args...
  arm=$1; name=$2; shift 2
  echo "=== $arm.$name start $(date -u +%FT%TZ)"
  nice -n 0 .venv/bin/python evaluate.py --checkpoint $R/$arm --val_shards "$VAL5" --json $R/$arm.$name.json "$@" \
    > $R/$arm.$name.log 2>&1
  echo "=== $arm.$name rc $? end $(date -u +%FT%TZ)"
}
export -f ev
hold() { echo "=== waiting for the lock $(date -u +%FT%TZ)"; flock /work/wt/heavy.lock bash -c "$1"; }
hold 'ev simclr knn_linear --train_shards "$TRAIN5" --protocol knn,linear --k 20,200
      ev supcon knn_linear --train_shards "$TRAIN5" --protocol knn,linear --k 20,200
      nice -n 0 .venv/bin/python bench.py methods probe_step --rounds 4 --steps 2 --batch_size 64 > $R/probe_step.log 2>&1
      echo "=== probe_step rc $? $(date -u +%FT%TZ)"
      ev simclrv2 knn_linear --train_shards "$TRAIN5" --protocol knn,linear --k 20,200'
hold 'ev simclr ft1_j0 --train_shards $ALLTRAIN --protocol finetune --label_fraction 0.01 --finetune_epochs 20 --ft_proj_selector 0
      ev simclrv2 ft1_j1 --train_shards $ALLTRAIN --protocol finetune --label_fraction 0.01 --finetune_epochs 20 --ft_proj_selector 1'
hold 'ev simclr ft10_j0 --train_shards $ALLTRAIN --protocol finetune --label_fraction 0.1 --finetune_epochs 1 --ft_proj_selector 0
      ev simclrv2 ft10_j1_distill --train_shards $ALLTRAIN --protocol finetune,distill --label_fraction 0.1 --finetune_epochs 1 --ft_proj_selector 1 --distill_shards "$TRAIN5" --distill_epochs 1'
echo "=== all done $(date -u +%FT%TZ)"
