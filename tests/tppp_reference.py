"""The unsplit single-process run the ``tppp`` mechanics test compares against, and its tiny job."""

from __future__ import annotations

import torch

from trainer.default_job import JobSpec, MarkovText, TinyLM, lm_loss

#: Small enough for 4 processes on 2 cores; dropout off so split and unsplit runs agree numerically.
SPEC = JobSpec(vocab=32, dim=32, heads=4, layers=4, hidden=64, seq_len=16, batch_size=8, dropout=0.0)
SEED = 7
LR = 1e-2


def reference_run(steps: int, dp: int) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    """Losses, final eval loss (mean over dp ranks' first eval batch) and final weights of one
    process training on every dp rank's batches at once."""
    torch.manual_seed(SEED)
    model = TinyLM(SPEC)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    streams = [MarkovText(SPEC, dp_rank=r, dp_size=dp, seed=SEED) for r in range(dp)]
    losses = []
    for _ in range(steps):
        batches = [s.next_batch() for s in streams]
        inputs = torch.cat([b[0] for b in batches])
        targets = torch.cat([b[1] for b in batches])
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        evals = [lm_loss(model(x), y) for x, y in (next(iter(s.eval_batches())) for s in streams)]
    return losses, torch.stack(evals).mean().item(), {k: v.detach().clone() for k, v in model.state_dict().items()}
