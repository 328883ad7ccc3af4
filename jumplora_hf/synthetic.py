"""Generated classification tasks: offline data for tests, the quickstart and smoke runs."""

from __future__ import annotations

import random

from .data import ContinualTask

FILLER = "the a of on in at by to we you they see saw put got with from near over under".split()
# (options, trigger words): the label is the option whose trigger appears in the sentence
KEYWORD_TASKS = [
    (["yes", "no"], ["sun", "moon"]),
    (["red", "blue"], ["cat", "dog"]),
    (["up", "down"], ["tree", "rock"]),
    (["hot", "cold"], ["fire", "ice"]),
]


def keyword_task(
    name: str,
    options: list[str],
    triggers: list[str],
    n_train: int,
    n_eval: int,
    seed: int = 0,
    filler: tuple[int, int] = (2, 5),
) -> ContinualTask:
    """Sentences of `filler` random words plus one trigger word; the label is the trigger's option."""
    rng = random.Random(seed)

    def records(n: int) -> list[dict[str, str]]:
        out = []
        for i in range(n):
            k = i % len(options)
            words = [rng.choice(FILLER) for _ in range(rng.randint(*filler))]
            words.insert(rng.randint(0, len(words)), triggers[k])
            out.append({"sentence": " ".join(words), "label": options[k]})
        rng.shuffle(out)
        return out

    return ContinualTask(name, records(n_train), records(n_eval), options=options, instruction=f"Task {name}.")


def keyword_task_stream(n_tasks: int, n_train: int, n_eval: int, filler: tuple[int, int] = (2, 5)) -> list[ContinualTask]:
    return [
        keyword_task(f"task{i}", *KEYWORD_TASKS[i % len(KEYWORD_TASKS)], n_train, n_eval, seed=i, filler=filler)
        for i in range(n_tasks)
    ]
