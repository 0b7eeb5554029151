"""Patch stem vs conv stem, trained from scratch on a TAO dataset: does the ViT learn objects or memorise scenes?

    python bench/stem_ablation.py --data /work/data/synth --epochs 9

Prints train and test mAP every 3 epochs for each stem (plain BCE, horizontal flips, AdamW; 1 thread).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from polymorphd.models.core.metrics import mean_average_precision
from polymorphd.models.core.preprocess import InputSpec, preprocess_batch
from polymorphd.models.nn.vit import VisionTransformer, ViTConfig
from polymorphd.models.train.train import load_data


def run(stem: str, X, Y, Xt, Yt, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        img_size=64, patch_size=8, num_classes=Y.shape[1], embed_dim=128, depth=6, num_heads=4, stem=stem
    )
    m = VisionTransformer(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
    Yf = torch.from_numpy(Y).float()

    def score(x: torch.Tensor, y: np.ndarray) -> float:
        m.eval()
        with torch.no_grad():
            p = torch.cat([torch.sigmoid(m(x[i : i + 256])) for i in range(0, len(x), 256)]).numpy()
        m.train()
        return mean_average_precision(y, p)[0]

    t0 = time.perf_counter()
    for ep in range(epochs):
        for idx in torch.randperm(len(X)).split(64):
            x = X[idx].flip(3) if torch.rand(1) < 0.5 else X[idx]
            loss = F.binary_cross_entropy_with_logits(m(x), Yf[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep % 3 == 2 or ep == epochs - 1:
            print(f"{stem:5} epoch {ep + 1:2d}  train mAP {score(X[:600], Y[:600]):.3f}  "
                  f"test mAP {score(Xt, Yt):.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = load_data(args.data, 64)
    spec = InputSpec(size=64)
    X, Xt = (torch.from_numpy(preprocess_batch(s.images, spec)) for s in (d.train, d.report))
    for stem in ("patch", "conv"):
        run(stem, X, d.train.Y, Xt, d.report.Y, args.epochs, args.seed)


if __name__ == "__main__":
    main()
