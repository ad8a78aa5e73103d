"""A Hugging Face ``transformers`` GPT-2 (built from a config: nothing is downloaded) trained by the Trainer,
exported to safetensors and loaded back into ``GPT2LMHeadModel``.

    pip install 'ckpt-ledger[transformers]'
    python examples/hf_gpt2.py --run-dir runs/gpt2 --out runs/gpt2.safetensors
    torchrun --standalone --nproc-per-node 2 examples/hf_gpt2.py --run-dir runs/gpt2 --stack fsdp

With ``--stack fsdp`` each GPT-2 block (``model.transformer.h``) is its own FSDP unit,
chosen by the ``shard_units`` hook; the optimizer is the user's (AdamW without decay on
biases and norms), and the step clips gradients (``step_fn``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from trainer import Trainer, TrainerConfig
from trainer.default_job import JobSpec, default_job
from trainer.export import export_model


def gpt2_config(vocab: int, seq_len: int):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def gpt2_for_trainer(config):
    """``GPT2LMHeadModel`` whose ``forward(input_ids)`` returns the logits, as the Trainer's loss expects.

    A subclass, not a wrapper: its parameter names are ``GPT2LMHeadModel``'s, so the exported
    weights load straight back into a plain ``GPT2LMHeadModel``.
    """
    from transformers import GPT2LMHeadModel

    class GPT2Logits(GPT2LMHeadModel):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(input_ids=input_ids).logits

    return GPT2Logits(config)


def adamw_without_decay_on_biases_and_norms(params) -> torch.optim.Optimizer:  # noqa: ANN001 - any iterable
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]  # matrices and embeddings
    no_decay = [p for p in params if p.ndim < 2]  # biases and norm scales
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=3e-3)


def clipped_step(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss = trainer.loss_fn(trainer.model(inputs), targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), max_norm=1.0)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", default=None, help="export the final weights here (.safetensors)")
    parser.add_argument("--stack", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    spec = JobSpec(vocab=64, seq_len=32)
    _, data_fn, loss_fn, _ = default_job(spec)  # the package's generated text, as token ids
    config = gpt2_config(spec.vocab, spec.seq_len)
    job = {"name": "hf-gpt2", **config.to_diff_dict(), "data": spec.as_dict()}
    trainer = Trainer(
        TrainerConfig(run_dir=args.run_dir, stack=args.stack, steps=args.steps, ckpt_every=20, eval_every=20,
                      keep_last=2, job=job),
        model_fn=lambda: gpt2_for_trainer(config), data_fn=data_fn, loss_fn=loss_fn,
        optimizer_fn=adamw_without_decay_on_biases_and_norms,
        step_fn=clipped_step,
        shard_units=(lambda model: list(model.transformer.h)) if args.stack == "fsdp" else None,
    )
    outcome = trainer.fit()
    if outcome.exit_code != 0 or args.out is None or torch.distributed.is_initialized() and \
            torch.distributed.get_rank() != 0:
        return outcome.exit_code

    result = export_model(args.run_dir, "latest", args.out, fmt="safetensors")
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(load_file(args.out), strict=False)
    # lm_head shares the token embedding's weight: it may be stored once, under either name.
    if unexpected or any(key != "lm_head.weight" for key in missing):
        print(f"export does not fit GPT2LMHeadModel: missing {missing}, unexpected {unexpected}", file=sys.stderr)
        return 1
    print(f"exported {result.checkpoint_id} (step {result.step}) to {args.out}; "
          f"GPT2LMHeadModel loaded it ({sum(p.numel() for p in model.parameters())} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
