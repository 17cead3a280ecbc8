#!/usr/bin/env python3
"""PyTorch twin of `lmc train` on CIFAR-10 ConvNet-3, batch 128: for peak-memory (max RSS) and
wall-time comparisons of the same training in the two tools (run each under /usr/bin/time -v).

What it does, matching `lmc train --dataset cifar10 --model convnet:depth=3,width=128,norm=instance
--batch-size 128 --iterations N --eval-every 0`:
  * reads cifar-10-binary.tar.gz (the whole train and test split, kept as uint8 like lmc does);
  * per step: a shuffled batch of 128, per-channel normalisation, random crop (padding 4) and
    horizontal flip (one offset and flip per batch, not per image as lmc does: cheaper in Python,
    same memory footprint), forward, cross-entropy, backward, SGD(lr 0.01, momentum 0.9, wd 5e-4);
  * after N steps: test accuracy over the 10,000 test images in batches of 1000, no gradients.

Usage: python3 train_cifar_convnet3.py --data ../shared/data/cifar-10-binary.tar.gz [--iterations N] [--threads 2]
Needs: pip install torch numpy.
"""
import argparse, json, tarfile, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)


def load(path):
    """(train_x, train_y, test_x, test_y) as uint8 arrays (N, 3, 32, 32) and int64 labels."""
    parts = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if name.endswith(".bin") and ("data_batch" in name or "test_batch" in name):
                parts[name] = np.frombuffer(tar.extractfile(m).read(), dtype=np.uint8).reshape(-1, 3073)

    def split(names):
        rec = np.concatenate([parts[n] for n in names])
        return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int64)

    tx, ty = split([f"data_batch_{i}.bin" for i in range(1, 6)])
    vx, vy = split(["test_batch.bin"])
    return tx, ty, vx, vy


def convnet3(cin=3, width=128, hw=32):
    layers, c, s = [], cin, hw
    for _ in range(3):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(), nn.AvgPool2d(2)]
        c, s = width, s // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * s * s, 10))


def normalise(u8):
    return torch.from_numpy((u8.astype(np.float32) / 255.0 - MEAN) / STD)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    tx, ty, vx, vy = load(a.data)
    net = convnet3()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    t0 = time.time()
    order, pos = rng.permutation(len(tx)), 0
    for _ in range(a.iterations):
        if pos + 128 > len(order):
            order, pos = rng.permutation(len(tx)), 0
        idx = order[pos:pos + 128]
        pos += 128
        x = F.pad(normalise(tx[idx]), (4, 4, 4, 4))
        dy, dx = rng.integers(0, 9, 2)
        x = x[:, :, dy:dy + 32, dx:dx + 32]
        if rng.random() < 0.5:
            x = x.flip(3)
        loss = F.cross_entropy(net(x), torch.from_numpy(ty[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(vx), 1000):
            correct += (net(normalise(vx[s:s + 1000])).argmax(1) == torch.from_numpy(vy[s:s + 1000])).sum().item()
    print(json.dumps({"engine": f"torch {torch.__version__}", "iterations": a.iterations,
                      "seconds": round(time.time() - t0, 2), "test_accuracy": correct / len(vx)}))


if __name__ == "__main__":
    main()
