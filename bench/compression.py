"""Byte-grouped zstd (``zstd-bg``) vs plain zstd on trained-ish transformer weights, fp32 and bf16.

The weights come from a small decoder-style transformer (~6M parameters) trained for a
few dozen AdamW steps on a synthetic next-token task — default init moved by real
gradient updates, not random bytes and not zeros. All tensors of the state dict are
concatenated into one shard, as a rank's file would hold them. Both codecs run at
zstd level 3, single-threaded, through ``ledger.shard_codecs`` (what ``LocalBlobStore``
uses). Sizes are exact; speeds are medians of interleaved repetitions.
Run alone: ``python bench/compression.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from bench.harness import Context, Record, benchmark, interleaved, median, spread
from ledger import shard_codecs

VOCAB, D_MODEL, LAYERS, SEQ = 4096, 256, 4, 64


class TinyLM(nn.Module):
    """Embedding, a few pre-norm transformer layers, tied-free output head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, nhead=4, dim_feedforward=4 * D_MODEL, batch_first=True,
                                           norm_first=True, dropout=0.0)
        self.body = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.body(self.embed(tokens), mask=mask, is_causal=True))


def trained_weights(steps: int) -> dict[str, torch.Tensor]:
    """A TinyLM after ``steps`` AdamW steps on a learnable synthetic sequence task."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    transition = torch.randint(0, VOCAB, (VOCAB,), generator=gen)  # next token = f(token), with noise
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (8, 1), generator=gen)
        seq = [start]
        for _ in range(SEQ):
            nxt = transition[seq[-1]]
            noise = torch.rand(nxt.shape, generator=gen) < 0.1
            seq.append(torch.where(noise, torch.randint(0, VOCAB, nxt.shape, generator=gen), nxt))
        tokens = torch.cat(seq, dim=1)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def shard_bytes(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    """Every tensor, cast to ``dtype``, back to back (one rank's shard)."""
    return b"".join(t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes() for t in weights.values())


def _compare(ctx: Context, label: str, data: bytes, itemsize: int) -> list[Record]:
    reps = ctx.reps(3, 7)
    mb = len(data) / 1e6
    plain = shard_codecs.encode(data, "zstd")
    grouped = shard_codecs.encode(data, "zstd-bg")
    if shard_codecs.decode(grouped, "zstd-bg") != data or shard_codecs.decode(plain, "zstd") != data:
        raise RuntimeError(f"{label}: a codec did not round-trip")
    chosen = grouped[5]
    enc_bg, enc_z = interleaved(lambda: shard_codecs.encode(data, "zstd-bg"), lambda: shard_codecs.encode(data, "zstd"), reps)
    dec_bg, dec_z = interleaved(lambda: shard_codecs.decode(grouped, "zstd-bg"), lambda: shard_codecs.decode(plain, "zstd"), reps)
    bg_frac, z_frac = len(grouped) / len(data), len(plain) / len(data)
    detail = {"raw_bytes": len(data), "zstd_bytes": len(plain), "zstd_bg_bytes": len(grouped),
              "zstd_ratio": 1 / z_frac, "zstd_bg_ratio": 1 / bg_frac, "itemsize_chosen": chosen,
              "itemsize_expected": itemsize, "level": 3}
    return [
        Record.of(f"compression_{label}", bg_frac, z_frac, "stored/raw", goal="ratio < 1",
                  met=bg_frac < z_frac,
                  note=f"{mb:.0f} MB of trained weights: zstd-bg {1 / bg_frac:.3f}x vs zstd {1 / z_frac:.3f}x "
                       f"(probe chose itemsize {chosen})", detail=detail),
        Record.of(f"compression_{label}_encode_speed", mb / median(enc_bg), mb / median(enc_z), "MB/s",
                  better="higher", note="encode throughput (raw MB/s), zstd-bg incl. probe + grouping vs zstd",
                  detail={"zstd_bg_s": spread(enc_bg), "zstd_s": spread(enc_z), "raw_mb": mb}),
        Record.of(f"compression_{label}_decode_speed", mb / median(dec_bg), mb / median(dec_z), "MB/s",
                  better="higher", note="decode throughput (raw MB/s), zstd-bg incl. ungrouping vs zstd",
                  detail={"zstd_bg_s": spread(dec_bg), "zstd_s": spread(dec_z), "raw_mb": mb}),
    ]


_WEIGHTS: dict[int, dict[str, torch.Tensor]] = {}


def _weights(ctx: Context) -> dict[str, torch.Tensor]:
    steps = ctx.reps(10, 30)
    if steps not in _WEIGHTS:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        _WEIGHTS[steps] = trained_weights(steps)
        n = sum(t.numel() for t in _WEIGHTS[steps].values())
        ctx.log(f"trained TinyLM for {steps} steps: {n / 1e6:.1f}M parameters")
    return _WEIGHTS[steps]


@benchmark("compression_fp32")
def compression_fp32(ctx: Context) -> list[Record]:
    return _compare(ctx, "fp32", shard_bytes(_weights(ctx), torch.float32), 4)


@benchmark("compression_bf16")
def compression_bf16(ctx: Context) -> list[Record]:
    return _compare(ctx, "bf16", shard_bytes(_weights(ctx), torch.bfloat16), 2)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.harness import run_module

    sys.exit(run_module(__file__))
