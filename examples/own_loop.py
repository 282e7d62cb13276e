"""The README's "Use it in your own loop", as a file that runs: DP-BiTFiT of the
packaged all-MiniLM-L6-v2 on the packaged Rotten Tomatoes reviews, offline,
in a plain PyTorch loop with Poisson-sampled batches.

    python examples/own_loop.py            # 3 epochs over 10,000 reviews at ε = 3
    python examples/own_loop.py --quick    # seconds: 2 epochs over 256 reviews, 16 tokens (tests)

The block between the ``README`` markers is what the README shows, word for word
(tests/test_examples.py checks that the two agree).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dpft
from dpft.app import offline


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 epochs over 256 reviews, short sequences (seconds)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    task = offline.rotten_tomatoes()
    if args.quick:
        task = task.subset(256, 64)
    train_set = list(zip(task.x_train, task.y_train.tolist()))  # (text, label) pairs
    model, tokenizer = offline.load_text_model(None, task.num_labels)  # a new 2-class head "classifier"
    epochs, batch_size, max_len = (2, 64, 16) if args.quick else (3, 256, 64)

    # README >>>
    dpft.bitfit(model, extra=["classifier"])  # train the biases and the new head; freeze the rest
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    engine = dpft.PrivacyEngine(
        model,
        batch_size=batch_size,
        sample_size=len(train_set),
        epochs=epochs,
        target_epsilon=3.0,
        max_grad_norm=1.0,
    )
    engine.attach(optimizer)
    # Poisson sampling (what the accountant assumes), all epochs' steps in one pass
    loader = dpft.data.poisson_loader(train_set, batch_size=batch_size, steps=engine.planned_steps)

    model.train()
    for texts, labels in loader:
        if len(labels) == 0:
            engine.record_empty_batch()  # an empty Poisson batch: a noise-only step, accounted
        for chunk_texts, chunk_labels in dpft.data.split_physical((texts, labels), 32):
            batch = tokenizer(list(chunk_texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            loss = F.cross_entropy(model(**batch).logits, chunk_labels)  # mean over the chunk
            loss.backward()
        optimizer.step()  # applies (Σ_i clip(g_i) + σR·z) / batch_size
        optimizer.zero_grad()
    print(
        f"ε = {engine.epsilon:.3f} (δ = {engine.target_delta:g}), σ = {engine.noise_multiplier:.3f}, "
        f"{engine.steps} steps"
    )
    # <<< README

    model.eval()
    with torch.no_grad():
        enc = tokenizer(task.x_test, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        pred = torch.cat(
            [
                model(**{k: v[i : i + 256] for k, v in enc.items()}).logits.argmax(-1)
                for i in range(0, len(task.x_test), 256)
            ]
        )
    accuracy = float((pred.numpy() == task.y_test).mean())
    print(f"test accuracy {accuracy:.3f} (majority class {task.majority_baseline()[1]:.3f})")
    engine.detach()
    return {
        "epsilon": engine.epsilon,
        "steps": engine.steps,
        "planned_steps": engine.planned_steps,
        "accuracy": accuracy,
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
    }


if __name__ == "__main__":
    main()
