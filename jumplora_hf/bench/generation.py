"""Evaluating a plain transformers model (a merged or ledger-composed checkpoint) on encoded tasks, outside a
Trainer: greedy generation, each task scored with its own metric, as `ContinualSeq2SeqTrainer` evaluates."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import ContinualDataCollator, EncodedTask


@torch.no_grad()
def evaluate_tasks(model, tokenizer, tasks: Sequence[EncodedTask], batch_size: int = 32) -> list[float]:
    """The score of `model` on each task's eval prompts (greedy generation, the task's metric)."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = ContinualDataCollator(pad, encoder_decoder)
    model.eval()
    scores = []
    for task in tasks:
        texts = []
        for start in range(0, len(task.prompts), batch_size):
            batch = collate([task.prompts[i] for i in range(start, min(start + batch_size, len(task.prompts)))])
            out = model.generate(
                **batch,
                max_new_tokens=task.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            if not encoder_decoder:
                out = out[:, batch["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(out, skip_special_tokens=True)
        scores.append(task.evaluate(texts))
    return scores
