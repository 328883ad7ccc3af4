"""Evaluating a plain transformers model (a merged or ledger-composed checkpoint) on encoded tasks, outside a
Trainer: greedy generation, each task scored with its own metric, as `ContinualTrainer` evaluates; and where
the answers to old tasks come from (their own labels, a later task's, or neither)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import ContinualDataCollator, EncodedTask, normalize_answer


@torch.no_grad()
def generate_answers(model, tokenizer, task: EncodedTask, batch_size: int = 32) -> list[str]:
    """Greedy answers of `model` to the task's eval prompts."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = ContinualDataCollator(pad, encoder_decoder)
    model.eval()
    texts = []
    for start in range(0, len(task.prompts), batch_size):
        batch = collate([task.prompts[i] for i in range(start, min(start + batch_size, len(task.prompts)))])
        batch = {key: value.to(model.device) for key, value in batch.items()}
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
    return texts


def evaluate_tasks(model, tokenizer, tasks: Sequence[EncodedTask], batch_size: int = 32) -> list[float]:
    """The score of `model` on each task's eval prompts (greedy generation, the task's metric)."""
    return [task.evaluate(generate_answers(model, tokenizer, task, batch_size)) for task in tasks]


def answer_sources(answers: Sequence[str], own: Sequence[str], later: Sequence[Sequence[str]]) -> dict[str, float]:
    """Fractions of `answers` that are one of the task's own labels, a label of a later task, or anything else."""
    own_set = {normalize_answer(o) for o in own}
    later_set = {normalize_answer(o) for labels in later for o in labels} - own_set
    counts = {"own": 0, "later": 0, "other": 0}
    for answer in answers:
        text = normalize_answer(answer)
        counts["own" if text in own_set else "later" if text in later_set else "other"] += 1
    return {k: v / max(len(answers), 1) for k, v in counts.items()}
