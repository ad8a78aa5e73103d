"""The embedded default job: a tiny causal transformer LM on text from a fixed Markov chain.

Nothing is downloaded: every batch is generated from ``(seed, dp_rank, position)``,
so the data position is one integer and a resumed run sees exactly the batches an
uninterrupted run would. The chain gives each token a few likely successors, so the
loss falls visibly from ``ln(vocab)`` towards the chain's entropy within ~100 steps.

The model is a stack of identical :class:`Block` s built only from ``nn.Linear`` and
``nn.LayerNorm`` (attention projections and an MLP), so a tensor/pipeline stack can
split it into stages (``model.blocks``) and column/row-parallel layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# The chain is part of the task, not of the run: the same for every seed.
_CHAIN_SEED = 20240611
_EVAL_STREAM = 1_000_003  # eval batches come from a stream no training position reaches


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Sizes of the default job's model and data (recorded in the run's config as ``job``)."""

    vocab: int = 32
    dim: int = 64
    heads: int = 4
    layers: int = 4
    hidden: int = 128
    seq_len: int = 32
    batch_size: int = 8
    dropout: float = 0.05
    successors: int = 3
    eval_batches: int = 4

    def as_dict(self) -> dict:
        """Plain-dict form for ``TrainerConfig.job``."""
        return {"name": "markov-lm", **asdict(self)}


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP, both residual."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.LayerNorm(dim)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + attn(norm(x))``, then ``+ mlp(norm(.))``."""
        batch, length, dim = x.shape
        h = self.attn_norm(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(split(self.wq(h)), split(self.wk(h)), split(self.wv(h)), is_causal=True)
        x = x + self.dropout(self.wo(attn.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.dropout(self.w2(F.gelu(self.w1(self.mlp_norm(x)))))


class TinyLM(nn.Module):
    """Token + position embeddings, ``layers`` identical blocks, a final norm and an LM head."""

    def __init__(self, spec: JobSpec) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(spec.vocab, spec.dim)
        self.pos_emb = nn.Embedding(spec.seq_len, spec.dim)
        self.blocks = nn.ModuleList(Block(spec.dim, spec.heads, spec.hidden, spec.dropout) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(spec.dim)
        self.head = nn.Linear(spec.dim, spec.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def transition_matrix(spec: JobSpec) -> torch.Tensor:
    """The Markov chain: each token moves to one of ``successors`` tokens with fixed, uneven odds."""
    gen = torch.Generator().manual_seed(_CHAIN_SEED)
    probs = torch.zeros(spec.vocab, spec.vocab)
    weights = torch.tensor([0.6, 0.3, 0.1][: spec.successors] + [0.1] * max(0, spec.successors - 3))
    for token in range(spec.vocab):
        nxt = torch.randperm(spec.vocab, generator=gen)[: spec.successors]
        probs[token, nxt] = weights / weights.sum()
    return probs


class MarkovText:
    """Deterministic batches for one data-parallel rank; the state is the number of batches consumed."""

    def __init__(self, spec: JobSpec, *, dp_rank: int, dp_size: int, seed: int, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.device = torch.device(device)
        self.position = 0
        self._cdf = transition_matrix(spec).cumsum(dim=1).contiguous()

    def _batch(self, stream: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # One generator per (seed, stream, rank, index): any batch can be regenerated alone.
        key = ((self.seed * 1_000_033 + stream) * 65_537 + self.dp_rank) * 2_147_483_647 + index
        gen = torch.Generator().manual_seed(key % (2**63 - 1))
        spec = self.spec
        tokens = torch.empty(spec.batch_size, spec.seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(spec.vocab, (spec.batch_size,), generator=gen)
        uniform = torch.rand(spec.seq_len, spec.batch_size, 1, generator=gen)
        for t in range(spec.seq_len):
            # Inverse-CDF sampling of the next token from the current token's row of the chain.
            nxt = torch.searchsorted(self._cdf[tokens[:, t]], uniform[t], right=True).squeeze(1)
            tokens[:, t + 1] = nxt.clamp_(max=spec.vocab - 1)
        tokens = tokens.to(self.device)
        return tokens[:, :-1], tokens[:, 1:]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch ``(inputs, targets)``."""
        batch = self._batch(0, self.position)
        self.position += 1
        return batch

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out batches of this rank (the same at every evaluation)."""
        for index in range(self.spec.eval_batches):
            yield self._batch(_EVAL_STREAM, index)

    def state_dict(self) -> dict:
        """The data position (everything else is derived from the seed and rank)."""
        return {"position": self.position, "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position."""
        self.position = int(state["position"])


def chain_entropy(spec: JobSpec) -> float:
    """The loss a perfect model would reach (nats per token)."""
    probs = transition_matrix(spec)
    row = probs[0][probs[0] > 0]
    return float(-(row * row.log()).sum())


def default_job(spec: JobSpec | None = None):
    """``(model_fn, data_fn, loss_fn, job_description)`` of the default job for :class:`trainer.Trainer`."""
    spec = spec or JobSpec()

    def model_fn() -> nn.Module:
        return TinyLM(spec)

    def data_fn(dp_rank: int, dp_size: int, seed: int, device: torch.device) -> MarkovText:
        return MarkovText(spec, dp_rank=dp_rank, dp_size=dp_size, seed=seed, device=device)

    return model_fn, data_fn, lm_loss, spec.as_dict()


__all__ = ["Block", "JobSpec", "MarkovText", "TinyLM", "chain_entropy", "default_job", "lm_loss"]
