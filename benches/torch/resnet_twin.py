#!/usr/bin/env python3
"""PyTorch twin of lmc's ResNets: the same architectures with the same module names, to check lmc
against an independent implementation.

  fixture --out FILE [--spec S] [--images N] [--seed K] [--digits CSV.GZ]
      Builds the twin (PyTorch's own initialisation, then batch-norm scales, shifts and running
      statistics set to random values and num_batches_tracked to 5), takes N real images (the
      digits, 8x8, scaled to [0, 1] and standardised), and writes one safetensors file with:
        - the state dict under PyTorch's names (num_batches_tracked as int64 scalars),
        - `fixture.x` (N, 1, 8, 8) and `fixture.y` (N,),
        - `fixture.logits_train` (training mode) and `fixture.logits_eval` (evaluation mode),
        - `after.NAME` for every state-dict entry after one SGD step (lr 0.1, momentum 0.9,
          weight decay 5e-4) on those images in training mode: parameters and running
          statistics as PyTorch leaves them.
      lmc's test `train/tests/torch_parity.rs` reads the committed file.
  check-export FILE --spec S --in-channels C --classes K
      Loads a file written by `lmc export --no-mask` with load_state_dict(strict=True) and prints
      the number of tensors and the eval-mode logits of a zero image.
  train-cifar --data cifar-10-binary.tar.gz [--spec resnet20] [--epochs 30] [--threads 2]
      OpenLTH's CIFAR ResNet recipe shortened to --epochs (batch 128, SGD lr 0.1, momentum 0.9,
      weight decay 1e-4, lr x0.1 at 50% and 75% of training, per-image random crop with padding
      4 and horizontal flip, OpenLTH's kaiming_normal / uniform batch-norm init; --bn-init ones
      keeps PyTorch's unit batch-norm scales instead), then test
      accuracy in evaluation mode; prints JSON with the accuracy and wall time. The lmc twin:
      lmc train --dataset cifar10 --model SPEC --epochs E --batch-size 128 --lr 0.1
        --momentum 0.9 --weight-decay 1e-4 --schedule multistep:0.5,0.75 --eval-every 0

Specs as lmc writes them: resnet:depth=D,width=W[,norm=batch], resnet18:width=W, resnet10:width=W
(batch norm only here). Needs: pip install torch safetensors numpy.
"""
import argparse, gzip, sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """OpenLTH's cifar_resnet and DC/IDC's CIFAR ResNet-18/10 (as in torch_reference.py), with the
    final average pool over the whole last plane so any input size works."""

    def __init__(self, cin, stem, stages, classes):
        super().__init__()
        self.conv = nn.Conv2d(cin, stem, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(stem)
        blocks, c = [], stem
        for i, (width, count) in enumerate(stages):
            for j in range(count):
                blocks.append(BasicBlock(c, width, 2 if (j == 0 and i > 0) else 1))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def build(spec, cin, classes):
    head, _, args = spec.partition(":")
    kv = dict(a.split("=") for a in args.split(",") if a)
    if kv.get("norm", "batch") != "batch":
        sys.exit(f"{spec}: the twin has batch norm only")
    if head in ("resnet", "resnet20"):
        depth, width = int(kv.get("depth", 20)), int(kv.get("width", 16))
        n = (depth - 2) // 6
        return ResNet(cin, width, [(width, n), (2 * width, n), (4 * width, n)], classes)
    if head in ("resnet18", "resnet10"):
        width, b = int(kv.get("width", 64)), 2 if head == "resnet18" else 1
        return ResNet(cin, width, [(width << s, b) for s in range(4)], classes)
    sys.exit(f"unknown spec {spec}")


def digits(path, n):
    rows = np.loadtxt(gzip.open(path, "rt"), delimiter=",", max_rows=n)
    x = rows[:, :64].astype(np.float32) / 16.0
    x = (x - x.mean()) / x.std()
    return torch.from_numpy(x.reshape(n, 1, 8, 8).copy()), torch.from_numpy(rows[:, 64].astype(np.int64))


def fixture(a):
    torch.manual_seed(a.seed)
    net = build(a.spec, 1, 10)
    g = torch.Generator().manual_seed(a.seed + 1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=g)
            m.bias.data = 0.2 * torch.randn(c, generator=g)
            m.running_mean = 0.3 * torch.randn(c, generator=g)
            m.running_var = 0.5 + torch.rand(c, generator=g)
            m.num_batches_tracked = torch.tensor(5, dtype=torch.long)
    x, y = digits(a.digits, a.images)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    out = dict(start)
    with torch.no_grad():
        net.eval()
        out["fixture.logits_eval"] = net(x)
        net.train()
        out["fixture.logits_train"] = net(x)
    net.load_state_dict(start)  # the training-mode pass above moved the running statistics
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    for k, v in net.state_dict().items():
        out[f"after.{k}"] = v
    out["fixture.x"], out["fixture.y"] = x, y
    save_file({k: v.contiguous() for k, v in out.items()}, a.out, metadata={"spec": a.spec, "torch": torch.__version__})
    print(f"{a.out}: {len(start)} state-dict tensors, {a.images} images, torch {torch.__version__}")


# The CIFAR-10 reader and normalisation of the ConvNet twin next to this file (the script's
# folder is on sys.path when it runs).
from train_cifar_convnet3 import MEAN, STD, load as cifar  # noqa: E402


def train_cifar(a):
    import json, time
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    tx, ty, vx, vy = cifar(a.data)
    if a.train_images:
        tx, ty = tx[:a.train_images], ty[:a.train_images]
    net = build(a.spec, 3, 10)
    if not a.spec.startswith(("resnet18", "resnet10")):
        for m in net.modules():  # OpenLTH: kaiming_normal model init, uniform batch-norm init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            if isinstance(m, nn.BatchNorm2d) and a.bn_init == "uniform":
                m.weight.data = torch.rand(m.weight.shape)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    per_epoch = -(-len(tx) // 128)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [a.epochs // 2, (3 * a.epochs) // 4], 0.1)
    norm = lambda u8: torch.from_numpy((u8.astype(np.float32) / 255.0 - MEAN) / STD)
    t0 = time.time()
    net.train()
    for epoch in range(a.epochs):
        order = rng.permutation(len(tx))
        for s in range(per_epoch):
            idx = order[s * 128:(s + 1) * 128]
            x = np.pad(norm(tx[idx]).numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
            off = rng.integers(0, 9, (len(idx), 2))
            flip = rng.random(len(idx)) < 0.5
            crops = np.stack([x[i, :, dy:dy + 32, dx:dx + 32] for i, (dy, dx) in enumerate(off)])
            crops[flip] = crops[flip][..., ::-1]
            loss = F.cross_entropy(net(torch.from_numpy(np.ascontiguousarray(crops))), torch.from_numpy(ty[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        print(f"epoch {epoch + 1}: last loss {loss.item():.4f}, {time.time() - t0:.0f} s", file=sys.stderr)
    net.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(vx), 1000):
            correct += (net(norm(vx[s:s + 1000])).argmax(1) == torch.from_numpy(vy[s:s + 1000])).sum().item()
    print(json.dumps({"engine": f"torch {torch.__version__}", "spec": a.spec, "epochs": a.epochs, "bn_init": a.bn_init,
                      "seconds": round(time.time() - t0, 1), "test_accuracy": correct / len(vx)}))


def check_export(a):
    net = build(a.spec, a.in_channels, a.classes)
    state = load_file(a.file)
    net.load_state_dict(state, strict=True)
    net.eval()
    with torch.no_grad():
        z = net(torch.zeros(1, a.in_channels, 8, 8))
    print(f"{a.file}: load_state_dict(strict=True) took {len(state)} tensors; eval logits of a zero 8x8 image: {z.flatten().tolist()}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture")
    f.add_argument("--out", required=True)
    f.add_argument("--spec", default="resnet:depth=8,width=4")
    f.add_argument("--images", type=int, default=16)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--digits", default="../shared/data/digits/digits.csv.gz")
    c = sub.add_parser("check-export")
    c.add_argument("file")
    c.add_argument("--spec", required=True)
    c.add_argument("--in-channels", type=int, default=1)
    c.add_argument("--classes", type=int, default=10)
    t = sub.add_parser("train-cifar")
    t.add_argument("--data", required=True)
    t.add_argument("--spec", default="resnet20")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--bn-init", choices=["uniform", "ones"], default="uniform",
                   help="batch-norm scales: OpenLTH's U(0, 1) (default) or PyTorch's ones (a diagnostic)")
    t.add_argument("--train-images", type=int, default=0, help="only the first N training images (a smoke run)")
    a = p.parse_args()
    torch.set_num_threads(1)
    {"fixture": fixture, "check-export": check_export, "train-cifar": train_cifar}[a.cmd](a)


if __name__ == "__main__":
    main()
