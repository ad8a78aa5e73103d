"""A small Hugging Face Trainer job whose checkpoints, resume and retention go through the ledger.

    python examples/hf_trainer_job.py --run-dir runs/hf --steps 60 --save-steps 20
    ckpt-ledger inspect runs/hf

A tiny GPT-2 (built from a config, nothing downloaded) learns a repeating token pattern.
Kill it (even with SIGKILL) and run the same command again: it resumes from the ledger's
verified resume target and finishes at --steps. SIGTERM/SIGUSR1 save, record the attempt as
preempted and exit 75 ("requeue me"). Needs ``pip install 'ckpt-ledger[transformers]'``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from trainer.integrations.transformers import LedgerCallback


class Patterns(torch.utils.data.Dataset):
    """Sequences of a repeating 4-token pattern with a random offset: easy to learn, loss falls fast."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        base = torch.tensor([3, 7, 1, 9]).repeat(5)[:16]
        self.rows = [torch.roll(base, int(torch.randint(0, 4, (1,), generator=gen))) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class SlowSteps(TrainerCallback):
    """Stands in for real work per step, so a test can interrupt the job mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=60, help="total optimizer steps of the run")
    parser.add_argument("--save-steps", type=int, default=20, help="checkpoint (and evaluate) every N steps")
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--keep-best", type=int, default=1)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    ledger_cb = LedgerCallback(args.run_dir, keep_last=args.keep_last, keep_best=args.keep_best)
    training_args = TrainingArguments(
        output_dir=f"{args.run_dir}/hf-staging",  # the Trainer writes here; the callback moves each save into the run
        max_steps=args.steps, save_steps=args.save_steps, eval_strategy="steps", eval_steps=args.save_steps,
        logging_steps=5, per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=5e-3,
        use_cpu=True, report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    callbacks = [ledger_cb] + ([SlowSteps(args.step_sleep)] if args.step_sleep else [])
    trainer = Trainer(model=model, args=training_args, train_dataset=Patterns(256, seed=1),
                      eval_dataset=Patterns(32, seed=2), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=LedgerCallback.resume_path(args.run_dir))
    return ledger_cb.exit_code


if __name__ == "__main__":
    sys.exit(main())
