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


# ----------------------------------------------------------------------------- a stream shaped like Standard CL
# Four tasks of different kinds, each with its own label set, over sentences of one distribution, as Standard CL's
# dbpedia / amazon / yahoo / agnews are all short texts with their own label spaces. Every sentence has a topic, a
# sentiment, an amount and an animal; task i asks about one of them. No rule contradicts another (the label sets are
# disjoint), so a model that keeps every skill answers all four, while one that drifts to the newest task answers the
# old questions with the newest task's labels: forgetting as in Standard CL.
_TOPIC_WORDS = {
    "sports": [
        "the football match",
        "the tennis final",
        "the marathon",
        "the league table",
        "the new coach",
        "the stadium",
        "the relay race",
        "the chess tournament",
    ],
    "food": [
        "the soup recipe",
        "the bakery",
        "the dinner menu",
        "the new chef",
        "the pasta dish",
        "the cake",
        "the street food",
        "the cheese market",
    ],
    "weather": [
        "the storm",
        "the forecast",
        "the heatwave",
        "the snowfall",
        "the morning fog",
        "the rain",
        "the strong wind",
        "the thunder",
    ],
    "music": [
        "the concert",
        "the new album",
        "the orchestra",
        "the guitar solo",
        "the choir",
        "the piano lesson",
        "the band",
        "the song contest",
    ],
}
_SENTIMENT_WORDS = {
    "positive": ["great", "wonderful", "excellent", "lovely", "delightful", "superb", "pleasant", "brilliant"],
    "negative": ["awful", "terrible", "dreadful", "boring", "horrible", "disappointing", "miserable", "dull"],
}
_AMOUNTS = {
    "small": ["two", "three", "four", "five", "six", "seven", "a few", "a couple of"],
    "large": ["ninety", "eighty", "seventy", "hundreds of", "thousands of", "a million", "countless", "sixty"],
}
_ANIMALS = {
    "pet": ["cat", "dog", "hamster", "rabbit", "parrot", "goldfish", "kitten", "puppy"],
    "wild": ["wolf", "tiger", "eagle", "bear", "lion", "shark", "crocodile", "leopard"],
}
_WHO = ["my neighbour", "the teacher", "a friend", "my brother", "the old man", "our guide", "my aunt", "the student"]
_FRAMES = [
    "{Who} had a {adj} time with {topic}, counted {amount} stars and watched a {animal}.",
    "After {topic}, {who} felt {adj}, wrote {amount} letters and drew a {animal}.",
    "{Who} called {topic} {adj}, bought {amount} tickets and met a {animal}.",
    "A {adj} day: {who} followed {topic}, saw {amount} lights and fed a {animal}.",
]

STANDARD_LIKE_TASKS = [
    ("topic", "What is the sentence about?", ["sports", "food", "weather", "music"]),
    ("sentiment", "Is the feeling in the sentence positive or negative?", ["positive", "negative"]),
    ("amount", "Is the amount in the sentence small or large?", ["small", "large"]),
    ("animal", "Is the animal in the sentence a pet or a wild animal?", ["pet", "wild"]),
]


def _sentence(properties: dict[str, str], rng: random.Random) -> str:
    who = rng.choice(_WHO)
    return rng.choice(_FRAMES).format(
        who=who,
        Who=who[0].upper() + who[1:],
        topic=rng.choice(_TOPIC_WORDS[properties["topic"]]),
        adj=rng.choice(_SENTIMENT_WORDS[properties["sentiment"]]),
        amount=rng.choice(_AMOUNTS[properties["amount"]]),
        animal=rng.choice(_ANIMALS[properties["animal"]]),
    )


def standard_like_stream(
    n_tasks: int = 4, n_train: int | Sequence[int] = 192, n_eval: int = 32, seed: int = 0
) -> list[ContinualTask]:
    """Tasks shaped like Standard CL over one sentence distribution: the topic (4 labels), the sentiment (2), the size
    of an amount (2: a property of numbers) and the kind of an animal (2: a property of words), each with its own instruction and label set. A
    task's labels are balanced; the other properties of its sentences are random. `n_train` is one count for every
    task or one per task; deterministic in `seed`; train and eval never share a sentence."""
    if not 1 <= n_tasks <= len(STANDARD_LIKE_TASKS):
        raise ValueError(f"n_tasks must be between 1 and {len(STANDARD_LIKE_TASKS)}, got {n_tasks}")
    train_sizes = [n_train] * n_tasks if isinstance(n_train, int) else list(n_train)
    if len(train_sizes) != n_tasks:
        raise ValueError(f"n_train has {len(train_sizes)} counts for {n_tasks} tasks; give one count or one per task")
    tasks = []
    for (name, instruction, options), size in zip(STANDARD_LIKE_TASKS[:n_tasks], train_sizes):
        rng = random.Random(f"{seed}-{name}")
        seen: set[str] = set()

        def records(n: int) -> list[dict]:
            out = []
            while len(out) < n:
                properties = {task: rng.choice(labels) for task, _, labels in STANDARD_LIKE_TASKS}
                properties[name] = options[len(out) % len(options)]
                sentence = _sentence(properties, rng)
                if sentence not in seen:
                    seen.add(sentence)
                    out.append({"sentence": sentence, "label": properties[name], "properties": properties})
            rng.shuffle(out)
            return out

        evaluation = records(n_eval)
        tasks.append(ContinualTask(name, records(size), evaluation, options=options, instruction=instruction))
    return tasks
