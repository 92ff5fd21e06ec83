"""A user's own CNN, written from the README alone, decoupled with fastdni.nn.decouple's defaults: the test
of the library's defaults on a model of one's own (results in docs/mnist.md). One epoch of MNIST, batch 64, Adam 1e-3 on the model.

    python scripts/decouple_own_cnn.py {backprop,cdni,dni} [epochs]   # LR / SG_LR: the model's / SG models' Adam lr
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from fastdni.data import load_mnist
from fastdni.nn import decouple
torch.set_num_threads(1)
mode, epochs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
torch.manual_seed(0)
net = nn.Sequential()
net.add_module("b1", nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
net.add_module("b2", nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
net.add_module("b3", nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU()))
net.add_module("head", nn.Linear(128, 10))
sg_lr = float(os.environ.get("SG_LR", "1e-3"))
sgs = None if mode == "backprop" else decouple(net, at=["b1", "b2", "b3"], context_features=10 if mode == "cdni" else 0,
                                               sg_optimizer=lambda p: torch.optim.Adam(p, lr=sg_lr))
lr = float(os.environ.get("LR", "1e-3"))
opt = torch.optim.Adam(net.parameters(), lr=lr)
d = load_mnist()
B = 64
t0 = time.time()
for epoch in range(epochs):
    perm = torch.randperm(60000, generator=torch.Generator().manual_seed(epoch))
    for i in range(0, 60000 - B + 1, B):
        idx = perm[i:i + B]
        x, y = d.train_images[idx], d.train_labels[idx]
        if sgs is not None:
            sgs.context = y
        F.cross_entropy(net(x), y).backward()
        opt.step(); opt.zero_grad()
        if sgs is not None:
            sgs.step()
net.eval()
with torch.no_grad():
    err = sum(int((net(d.test_images[i:i+1000]).argmax(1) != d.test_labels[i:i+1000]).sum()) for i in range(0, 10000, 1000)) / 100
if sgs is not None:
    print("last SG regression losses:", {k: f"{v:.3g}" for k, v in sgs.sg_losses().items()})
print(f"{mode} lr={lr} sg_lr={sg_lr}: test error {err:.2f}% after {epochs} epoch(s), {time.time()-t0:.0f} s")
