"""Generated classification tasks: offline data for tests, the quickstart and smoke runs."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..data import ContinualTask

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


def keyword_task_stream(
    n_tasks: int, n_train: int, n_eval: int, filler: tuple[int, int] = (2, 5)
) -> list[ContinualTask]:
    return [
        keyword_task(f"task{i}", *KEYWORD_TASKS[i % len(KEYWORD_TASKS)], n_train, n_eval, seed=i, filler=filler)
        for i in range(n_tasks)
    ]


# ----------------------------------------------------------------------------- a conflicting task stream
# Categories a sentence can mention: (name, the task's instruction). Every task asks a yes/no question about
# one category, over sentences that mention a random subset of all of them.
# "animal" comes last: it is the only rule that no extra word or phrase gives away (the noun is there either
# way), so a small model needs many more steps to learn it.
CATEGORY_RULES = [
    ("color", "Does the sentence mention a color?"),
    ("number", "Does the sentence mention a number?"),
    ("food", "Does the sentence mention any food?"),
    ("place", "Does the sentence mention a place?"),
    ("day", "Does the sentence mention a day of the week?"),
    ("animal", "Does the sentence mention an animal?"),
]
CONFLICT_OPTIONS = ["yes", "no"]
# (singular, plural) nouns: an animal when the sentence mentions one, a plain object otherwise
_ANIMALS = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("horse", "horses"),
    ("bird", "birds"),
    ("rabbit", "rabbits"),
    ("cow", "cows"),
    ("fox", "foxes"),
    ("duck", "ducks"),
    ("goat", "goats"),
    ("mouse", "mice"),
]
_OBJECTS = [
    ("box", "boxes"),
    ("chair", "chairs"),
    ("lamp", "lamps"),
    ("bag", "bags"),
    ("book", "books"),
    ("ball", "balls"),
    ("hat", "hats"),
    ("kite", "kites"),
    ("clock", "clocks"),
    ("bottle", "bottles"),
]
_COLORS = "red blue green yellow black white purple pink brown gray".split()
_NUMBERS = "two three four five six seven eight nine ten twelve".split()
_FOODS = "bread cheese rice soup cake pizza pasta cookies honey eggs".split()
_PLACES = [
    "in the kitchen",
    "at the park",
    "in the forest",
    "near the river",
    "at the school",
    "in the garden",
    "at the beach",
    "in the city",
    "at the market",
    "in the village",
]
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_OPENERS = ["I saw", "We found", "She painted", "They bought", "He drew", "You moved", "We cleaned", "I carried"]
_DETERMINERS = ["a", "the", "my", "that", "our"]


def conflicting_sentence(mentions: set[str], rng: random.Random) -> str:
    """A sentence that mentions exactly the categories in `mentions` (names from `CATEGORY_RULES`)."""
    singular, plural = rng.choice(_ANIMALS if "animal" in mentions else _OBJECTS)
    words = [rng.choice(_OPENERS)]
    words.append(rng.choice(_NUMBERS) if "number" in mentions else rng.choice(_DETERMINERS))
    if "color" in mentions:
        words.append(rng.choice(_COLORS))
    words.append(plural if "number" in mentions else singular)
    tails = []
    if "food" in mentions:
        tails.append(f"{rng.choice(['and some', 'with some', 'next to the'])} {rng.choice(_FOODS)}")
    if "place" in mentions:
        tails.append(rng.choice(_PLACES))
    if "day" in mentions:
        tails.append(f"on {rng.choice(_DAYS)}")
    rng.shuffle(tails)
    return " ".join(words + tails) + "."


def conflicting_records(n: int, rng: random.Random) -> list[dict]:
    """`n` sentences with the set of categories each mentions (`"mentions"`, in `CATEGORY_RULES` order).

    Each category is mentioned by exactly ceil(n/2) or floor(n/2) sentences, independently of the others.
    """
    shown = {}
    for name, _ in CATEGORY_RULES:
        flags = [i < (n + 1) // 2 for i in range(n)]
        rng.shuffle(flags)
        shown[name] = flags
    records = []
    for i in range(n):
        mentions = [name for name, _ in CATEGORY_RULES if shown[name][i]]
        records.append({"sentence": conflicting_sentence(set(mentions), rng), "mentions": mentions})
    return records


def conflicting_task_stream(
    n_tasks: int = 4, n_train: int | Sequence[int] = 384, n_eval: int = 48, seed: int = 0
) -> list[ContinualTask]:
    """Tasks that ask different yes/no questions about sentences of one distribution: their labels conflict.

    Every task has the options "yes"/"no" and sentences built from the same words (an opener, a noun phrase,
    optional food / place / day phrases), each mentioning a random subset of the categories of
    `CATEGORY_RULES`. Task i (named after its category, in `CATEGORY_RULES` order) asks, in plain English,
    whether the sentence mentions that category. Each category is shown in half of a split's sentences,
    independently of the others, so the labels are balanced and two tasks' rules disagree on about half
    of the sentences (measured over 4 × 384 training sentences of seed 0: 0.50 on average over task pairs,
    every pair between 0.45 and 0.55; tested). A model that only follows the newest task therefore answers an
    old task at chance. `n_train` is one count for every task or one per task. Deterministic in `seed`; the
    records also carry `"mentions"`, the categories shown.
    """
    if not 1 <= n_tasks <= len(CATEGORY_RULES):
        raise ValueError(f"n_tasks must be between 1 and {len(CATEGORY_RULES)}, got {n_tasks}")
    train_sizes = [n_train] * n_tasks if isinstance(n_train, int) else list(n_train)
    if len(train_sizes) != n_tasks:
        raise ValueError(f"n_train has {len(train_sizes)} counts for {n_tasks} tasks; give one count or one per task")
    tasks = []
    for (name, instruction), size in zip(CATEGORY_RULES[:n_tasks], train_sizes):
        rng = random.Random(f"{seed}-{name}")
        train, evaluation = (
            [{**r, "label": "yes" if name in r["mentions"] else "no"} for r in conflicting_records(n, rng)]
            for n in (size, n_eval)
        )
        tasks.append(ContinualTask(name, train, evaluation, options=CONFLICT_OPTIONS, instruction=instruction))
    return tasks
