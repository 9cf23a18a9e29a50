#!/bin/bash
# Evaluations of bench/results/methods_cifar10_cpu.json, in priority order, each under the shared lock.
cd /work/wt/i31-family
R=/tmp/i31/runs
TRAIN10="/tmp/i31/data/train/train-{000000..000009}.tar"   # 10,000 images: the kNN index / linear train set
VAL5="/tmp/i31/data/test/test-{000000..000004}.tar"        # 5,000 test images
ALLTRAIN=/tmp/i31/data/train
ev() {  # arm name args...
  arm=$1; name=$2; shift 2
  echo "=== $arm.$name start $(date -u +%FT%TZ)"
  flock /work/wt/heavy.lock nice -n 0 .venv/bin/python evaluate.py --checkpoint $R/$arm --val_shards "$VAL5" \
    --json $R/$arm.$name.json "$@" > $R/$arm.$name.log 2>&1
  echo "=== $arm.$name rc $? end $(date -u +%FT%TZ)"
}
while pgrep -f pretrain_arms.sh > /dev/null; do sleep 10; done
for arm in simclr supcon simclrv2; do
  ev $arm knn_linear --train_shards "$TRAIN10" --protocol knn,linear --k 20,200
done
flock /work/wt/heavy.lock nice -n 0 .venv/bin/python bench.py methods probe_step --rounds 6 --steps 2 > $R/probe_step.log 2>&1
echo "=== probe_step rc $? $(date -u +%FT%TZ)"
ev simclr ft1_j0 --train_shards $ALLTRAIN --protocol finetune --label_fraction 0.01 --finetune_epochs 20 --ft_proj_selector 0
ev simclrv2 ft1_j1 --train_shards $ALLTRAIN --protocol finetune --label_fraction 0.01 --finetune_epochs 20 --ft_proj_selector 1
ev simclr ft10_j0 --train_shards $ALLTRAIN --protocol finetune --label_fraction 0.1 --finetune_epochs 2 --ft_proj_selector 0
ev simclrv2 ft10_j1_distill --train_shards $ALLTRAIN --protocol finetune,distill --label_fraction 0.1 --finetune_epochs 2 --ft_proj_selector 1 --distill_shards "$TRAIN10" --distill_epochs 2
echo "=== all done $(date -u +%FT%TZ)"
