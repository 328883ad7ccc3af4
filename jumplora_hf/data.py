"""Tasks, prompts, tokenisation and collation for continual classification-as-generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

DEFAULT_INSTRUCTION = "Choose the option that answers the input."
GENERATION_INSTRUCTION = "Respond to the input."


@dataclass
class ContinualTask:
    """One task of a sequence: examples are records with a text and a label column.

    `options` are the label words in prompt order; when None they are the sorted labels of the
    training split. Every train and eval label must be one of them. A `generation` task (summarisation, QA)
    has free-text targets instead: no options in the prompt, and its labels are not checked.

    `metric` scores the generated answers against the eval labels: None is exact match (after lower-casing and
    collapsing whitespace); a callable `f(predictions, references)` returning a number or a dict; an `evaluate`
    module, or the name/path `evaluate.load` takes. `metric_key` picks the entry of a dict result (needed when it
    has several). The accuracy matrix then holds each task's own score, and the report names its metric.
    """

    name: str
    train_dataset: Any  # datasets.Dataset or a list of dicts
    eval_dataset: Any
    options: Sequence[str] | None = None
    instruction: str | None = None
    text_column: str = "sentence"
    label_column: str = "label"
    metric: Any = None
    metric_key: str | None = None
    generation: bool = False

    def column(self, split: str, name: str) -> list:
        data = self.train_dataset if split == "train" else self.eval_dataset
        if data is None or len(data) == 0:
            raise ValueError(f"task {self.name!r}: the {split} split is empty; give it at least one example")
        if isinstance(data, Dataset):
            if name not in data.column_names:
                raise ValueError(
                    f"task {self.name!r}: the {split} split has no column {name!r} (columns: {data.column_names})"
                )
            return list(data[name])
        missing = [i for i, record in enumerate(data) if name not in record]
        if missing:
            raise ValueError(f"task {self.name!r}: {split} record {missing[0]} has no field {name!r}")
        return [record[name] for record in data]

    def resolved_options(self) -> list[str]:
        """The options, checked against every label of both splits ([] for a generation task)."""
        if self.generation:
            return []
        labels = {split: [str(x) for x in self.column(split, self.label_column)] for split in ("train", "eval")}
        options = [str(o) for o in self.options] if self.options is not None else sorted(set(labels["train"]))
        for split, values in labels.items():
            unknown = sorted(set(values) - set(options))
            if unknown:
                raise ValueError(
                    f"task {self.name!r}: {split} labels {unknown[:5]} are not among the task's options {options}; "
                    "fix the data or pass the full list of options"
                )
        return options


@dataclass
class EncodedTask:
    name: str
    train: Dataset  # input_ids, attention_mask, labels
    prompts: Dataset  # input_ids, attention_mask (generation inputs of the eval split)
    answers: list[str]  # gold label of each eval prompt
    max_new_tokens: int
    metric_name: str = "exact_match"
    score: Callable[[Sequence[str], Sequence[str]], float] | None = None

    def evaluate(self, predictions: Sequence[str]) -> float:
        return (self.score or exact_match_accuracy)(predictions, self.answers)


def normalize_answer(text: str) -> str:
    """Lower-case, strip, collapse whitespace: the exact-match normalisation."""
    return " ".join(text.lower().split())


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)) / len(answers)


def _pick(result, key: str | None, name: str) -> float:
    if isinstance(result, dict):
        if key is None:
            if len(result) != 1:
                raise ValueError(f"metric {name!r} returns {sorted(result)}: set the task's metric_key to one of them")
            key = next(iter(result))
        if key not in result:
            raise ValueError(f"metric {name!r} returns {sorted(result)}, not metric_key={key!r}")
        result = result[key]
    return float(result)


def resolve_metric(task: ContinualTask) -> tuple[str, Callable[[Sequence[str], Sequence[str]], float]]:
    """(name, score function) of a task's metric; checked on two of its own labels, before any training."""
    metric, key = task.metric, task.metric_key
    if metric is None:
        return "exact_match", exact_match_accuracy
    if isinstance(metric, str):
        import evaluate

        try:
            metric = evaluate.load(metric)
        except Exception as error:  # offline, unknown name, broken module: evaluate raises many kinds
            raise ValueError(
                f"task {task.name!r}: evaluate.load({task.metric!r}) failed ({type(error).__name__}: {error}). Offline, "
                "pass the path of a local metric module or a callable f(predictions, references)"
            ) from None
    if hasattr(metric, "compute"):
        label = getattr(metric, "name", type(metric).__name__)

        def raw(predictions, references, module=metric):
            return module.compute(predictions=list(predictions), references=list(references))
    elif callable(metric):
        label = getattr(metric, "__name__", type(metric).__name__)

        def raw(predictions, references, fn=metric):
            return fn(list(predictions), list(references))
    else:
        raise ValueError(
            f"task {task.name!r}: metric must be None, a callable, an evaluate module or its name, got {metric!r}"
        )
    probe = [str(x) for x in task.column("eval", task.label_column)[:2]]
    try:
        result = raw(probe, probe)
        _pick(result, key, label)
    except Exception as error:
        raise ValueError(
            f"task {task.name!r}: its metric fails on its own labels ({type(error).__name__}: {error})"
        ) from None
    name = key or (next(iter(result)) if isinstance(result, dict) else label)

    def score(predictions, references):
        return _pick(raw(predictions, references), key, name)

    return name, score


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_task(
    task: ContinualTask,
    tokenizer,
    is_encoder_decoder: bool,
    max_source_length: int,
    max_target_length: int | None = None,
) -> EncodedTask:
    """Tokenise a task: prompt = instruction + options + text + answer cue; only the text is truncated.

    Encoder-decoder: the prompt (+EOS) is the input, the answer (+EOS) the labels. Decoder-only: the
    prompt and " answer" + EOS form one sequence whose labels mask the prompt (-100), so the model
    learns to stop after the label and generation can halt on EOS.
    """
    options = task.resolved_options()
    metric_name, score = resolve_metric(task)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; answers must end with one so generation stops")
    instruction = task.instruction or (GENERATION_INSTRUCTION if task.generation else DEFAULT_INSTRUCTION)
    listed = "" if task.generation else f"\nOptions: {', '.join(options)}"
    head, cue = _ids(tokenizer, [f"{instruction}{listed}\nInput: ", "\nAnswer:"])
    prefix = [tokenizer.bos_token_id] if (not is_encoder_decoder and tokenizer.bos_token_id is not None) else []
    suffix = [tokenizer.eos_token_id] if is_encoder_decoder else []
    room = max_source_length - len(prefix) - len(head) - len(cue) - len(suffix)
    if room < 1:
        raise ValueError(
            f"task {task.name!r}: instruction and options alone take {max_source_length - room} tokens, more than "
            f"max_source_length={max_source_length}; raise max_source_length or shorten the instruction"
        )

    def target_ids(texts: list[str]) -> list[list[int]]:
        return _ids(tokenizer, [t if is_encoder_decoder else " " + t for t in texts])

    if task.generation:
        train_targets = [str(x) for x in task.column("train", task.label_column)]
        budget = (max_target_length or max(len(ids) for ids in target_ids(train_targets)) + 1) - 1
        answer_ids = {t: ids[:budget] for t, ids in zip(train_targets, target_ids(train_targets))}
        needed = budget + 1
    else:
        answer_ids = dict(zip(options, target_ids(options)))
        needed = max(len(ids) for ids in answer_ids.values()) + 1
    if not task.generation and max_target_length is not None and needed > max_target_length:
        longest = max(options, key=lambda o: len(answer_ids[o]))
        raise ValueError(
            f"task {task.name!r}: option {longest!r} needs {needed} target tokens with EOS, more than "
            f"max_target_length={max_target_length}; raise max_target_length"
        )

    def prompts(split: str) -> tuple[list[list[int]], list[str]]:
        texts = [str(t) for t in task.column(split, task.text_column)]
        labels = [str(x) for x in task.column(split, task.label_column)]
        return [prefix + head + ids[:room] + cue + suffix for ids in _ids(tokenizer, texts)], labels

    train_prompts, train_labels = prompts("train")
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, label in zip(train_prompts, train_labels):
        answer = answer_ids[label] + [tokenizer.eos_token_id]
        ids, targets = (prompt, answer) if is_encoder_decoder else (prompt + answer, [-100] * len(prompt) + answer)
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append(targets)
    eval_prompts, eval_labels = prompts("eval")
    generation = {"input_ids": eval_prompts, "attention_mask": [[1] * len(p) for p in eval_prompts]}
    return EncodedTask(
        name=task.name,
        train=Dataset.from_dict(rows),
        prompts=Dataset.from_dict(generation),
        answers=eval_labels,
        max_new_tokens=max_target_length or needed,
        metric_name=metric_name,
        score=score,
    )


@dataclass
class ContinualDataCollator:
    """Pads token lists into tensors.

    Training batches (with labels) pad on the right; generation batches of a decoder-only model pad on
    the left so that every prompt ends where generation starts.
    """

    pad_token_id: int
    is_encoder_decoder: bool
    label_pad_token_id: int = -100

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        has_labels = "labels" in features[0]
        left = not has_labels and not self.is_encoder_decoder
        batch = {}
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": self.label_pad_token_id}
        for key, pad in pads.items():
            if key not in features[0]:
                continue
            sequences = [list(f[key]) for f in features]
            width = max(len(s) for s in sequences)
            padded = [([pad] * (width - len(s)) + s) if left else (s + [pad] * (width - len(s))) for s in sequences]
            batch[key] = torch.tensor(padded, dtype=torch.long)
        return batch
