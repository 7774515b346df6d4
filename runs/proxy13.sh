#!/usr/bin/env bash
# Issue 13 proxy: half widths, fewer epochs. B (width-aware BN + supernet
# warm-up) first, then A (today's defaults) on the same backbone.
set -x
cd /work/main
COMMON="--data_dir=../shared/data/cifar10 --widths=32,64,128,256 --backbone_epochs=15 --warmup_epochs=3 --rnp_epochs=5 --penalties=0.07 --static_speedups=2,4,8 --verbose=2"
.venv/bin/python examples/cifar.py $COMMON --work_dir=runs/proxy_b --width_aware_bn --sandwich_paths=2 --steps=backbone,rnp,static,evaluate
mkdir -p runs/proxy_a && cp -n runs/proxy_b/backbone.keras runs/proxy_a/
.venv/bin/python examples/cifar.py $COMMON --work_dir=runs/proxy_a --steps=rnp,static,evaluate
