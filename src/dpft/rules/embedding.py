"""Rule for ``nn.Embedding``: the per-example weight gradient is
``onehot(ids_i)^T b_i``; it is kept in factored form with the ids standing in
for the one-hot rows, so its ghost norm is
``sum_{t,s} [id_t = id_s] <b_t, b_s>`` and no dense one-hot is ever built."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Call, Contribution, Factored, Rule, batchify


class EmbeddingRule(Rule):
    handles = ("weight",)
    eager: tuple[str, ...] = ()

    def needs_save(self, module: nn.Module, params: frozenset[str]) -> bool:
        return True

    def rows_ok(self, module: nn.Module, x: Tensor) -> bool:
        return True

    def save(self, call: Call, module: nn.Module, args: tuple, output: Tensor, params: frozenset[str]) -> None:
        call.saved["ids"] = args[0]

    def on_grad(self, call: Call, grad: Tensor, params: frozenset[str]) -> None:
        call.saved["grad"] = grad

    def contributions(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        m: nn.Embedding = call.module  # type: ignore[assignment]
        n = call.batch_size
        ids = batchify(call.saved["ids"], n).reshape(n, -1)
        b = call.saved["grad"].reshape(n, -1, m.embedding_dim)
        if m.padding_idx is not None:
            # the padding row never receives gradient
            b = b * (ids != m.padding_idx).unsqueeze(-1).to(b.dtype)
        return {"weight": Factored(ids=ids, num_rows=m.num_embeddings, right=b.unsqueeze(2), shape=m.weight.shape)}


def check_embedding(module: nn.Embedding, name: str) -> None:
    """Embedding options that cannot be made differentially private."""
    if module.scale_grad_by_freq:
        raise ValueError(
            f"dpft: Embedding '{name}' uses scale_grad_by_freq=True, which scales each example's "
            "gradient by token counts over the whole batch (it mixes examples); this is not "
            "compatible with per-example clipping. Set scale_grad_by_freq=False."
        )
    if module.sparse:
        raise ValueError(f"dpft: Embedding '{name}' uses sparse=True gradients; set sparse=False.")
