"""DP-BiTFiT in a plain PyTorch loop: the packaged all-MiniLM-L6-v2 on the
packaged Rotten Tomatoes reviews, offline, at epsilon = 3.

    python examples/dp_bitfit_sentiment.py --train-size 4000 --epochs 1
    python examples/dp_bitfit_sentiment.py --quick      # seconds: 256 reviews, 16 tokens

Uses the public API only: dpft.bitfit, dpft.PrivacyEngine, dpft.data.
Add ``--lora`` to train LoRA adapters (peft) + head instead of biases + head.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import dpft
from dpft.app import offline


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=128, help="expected logical batch size")
    ap.add_argument("--physical", type=int, default=32, help="max examples per forward/backward")
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="seconds: 256 training / 64 test reviews, batch 64, 16 tokens (overrides those options)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.batch_size, args.physical, args.max_len = 256, 64, 64, 32, 16
    torch.manual_seed(0)

    task = offline.rotten_tomatoes().subset(args.train_size, args.test_size)
    model, tok = offline.load_text_model(None, task.num_labels)
    if args.lora:
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
        )
    else:
        dpft.bitfit(model, extra=["classifier"])  # biases + the new head
    trainable = [p for p in model.parameters() if p.requires_grad]

    def encode(texts):
        return tok(list(texts), padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")

    n = len(task.y_train)
    optimizer = torch.optim.Adam(trainable, lr=args.lr)
    engine = dpft.PrivacyEngine(
        model,
        batch_size=args.batch_size,
        sample_size=n,
        epochs=args.epochs,
        target_epsilon=args.epsilon,
        max_grad_norm=1.0,
    )
    engine.attach(optimizer)
    loader = dpft.data.PoissonBatchSampler(n, batch_size=args.batch_size, steps=engine.planned_steps)
    model.train()
    for idx in loader:
        if not idx:
            engine.record_empty_batch()  # an empty Poisson batch: a noise-only step
        for chunk in dpft.data.split_physical(np.array(idx), args.physical):
            batch = encode([task.x_train[i] for i in chunk])
            logits = model(**batch).logits
            F.cross_entropy(logits, torch.as_tensor(task.y_train[chunk])).backward()  # mean over the chunk
        optimizer.step()
        optimizer.zero_grad()
    engine.detach()

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(task.y_test), 256):
            texts = task.x_test[start : start + 256]
            pred = model(**encode(texts)).logits.argmax(-1).numpy()
            correct += int((pred == task.y_test[start : start + 256]).sum())
    acc = correct / len(task.y_test)
    _, majority = task.majority_baseline()
    out = {
        "accuracy": acc,
        "majority": majority,
        "epsilon": engine.epsilon,
        "delta": engine.target_delta,
        "noise_multiplier": engine.noise_multiplier,
        "steps": engine.steps,
    }
    print(
        f"test accuracy {acc:.3f} (majority {majority:.3f}) at epsilon={engine.epsilon:.3f}, "
        f"delta={engine.target_delta:g}, sigma={engine.noise_multiplier:.3f}, {engine.steps} steps"
    )
    return out


if __name__ == "__main__":
    main()
