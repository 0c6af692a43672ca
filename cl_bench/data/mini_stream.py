"""The embedded offline stream: five small tasks generated in code, one per TRACE metric kind.

Each task is drawn from templates with a ``random.Random`` seeded by ``data_seed`` and the task's
name, written in TRACE's layout under ``cache_dir`` and then read back through
:func:`cl_bench.data.tasks.load_stream`, like any other stream. Every prompt ends with "Answer:" as
TRACE's do, so the tasks compete for the same cue and sequential training forgets measurably.

| task      | TRACE analogue        | metric          |
|-----------|-----------------------|-----------------|
| sentiment | C-STANCE / FOMC       | accuracy        |
| arith     | NumGLUE               | accuracy        |
| minutes   | MeetingBank           | rouge_l         |
| code      | Py150                 | edit_similarity |
| simplify  | 20Minuten             | sari            |
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from cl_bench.data.tasks import Example, TaskSpec, TaskStream, load_stream
from cl_bench.files import atomic_write
from cl_bench.rng import derive_seed


def _sentiment(rng: random.Random) -> Example:
    things = [
        "The phone",
        "This hotel",
        "The movie",
        "Our new laptop",
        "The restaurant",
        "That book",
        "The bus service",
        "This camera",
        "The concert",
        "The coffee machine",
        "The museum",
        "This jacket",
        "The app",
        "The hospital staff",
        "Our rental car",
        "The new album",
    ]
    says = {
        "A": [
            "works perfectly",
            "exceeded every expectation",
            "is a joy to use",
            "made our week",
            "was worth every cent",
            "is simply wonderful",
            "impressed the whole family",
        ],
        "B": [
            "broke after a week",
            "was a waste of money",
            "is painfully slow",
            "ruined our trip",
            "was rude and careless",
            "is the worst I have tried",
            "disappointed everyone",
        ],
        "C": [
            "arrived on a Tuesday",
            "comes in a grey box",
            "is sold in most shops",
            "was bought last spring",
            "has a manual in three languages",
            "opens at nine",
            "weighs about two kilograms",
        ],
    }
    label = rng.choice("ABC")
    review = f"{rng.choice(things)} {rng.choice(says[label])}."
    prompt = (
        "What is the sentiment of the review? Choose one option.\n"
        f"Review: {review}\nA. positive\nB. negative\nC. neutral\nAnswer:"
    )
    return Example(prompt, label)


def _arith(rng: random.Random) -> Example:
    names = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Ana"]
    items = ["apples", "marbles", "stamps", "books", "coins", "pencils", "shells", "cards"]
    name, item = rng.choice(names), rng.choice(items)
    a, b = rng.randint(2, 15), rng.randint(2, 9)
    if rng.random() < 0.5:
        story, result = f"{name} has {a} {item} and gets {b} more.", a + b
    else:
        a = a + b
        story, result = f"{name} has {a} {item} and gives away {b}.", a - b
    prompt = (
        "Solve the math problem and give only the number.\n"
        f"Problem: {story} How many {item} does {name} have now?\nAnswer:"
    )
    return Example(prompt, str(result))


def _minutes(rng: random.Random) -> Example:
    bodies = [
        "city council",
        "school board",
        "library committee",
        "transport board",
        "parks commission",
        "housing committee",
        "health board",
        "water authority",
    ]
    topics = [
        "the bike lane plan",
        "the new playground",
        "the budget for next year",
        "the bus timetable",
        "the tree planting project",
        "the parking fees",
        "the summer festival",
        "the road repairs",
    ]
    actions = ["approve", "reject", "delay", "review"]
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
    body, topic, action = rng.choice(bodies), rng.choice(topics), rng.choice(actions)
    record = (
        f"The {body} met on {rng.choice(days)} evening. Several residents spoke about {topic}. "
        f"After a long discussion, the members voted to {action} {topic}. "
        f"The next meeting is planned for {rng.choice(['March', 'June', 'September', 'December'])}."
    )
    prompt = f"Summarize the meeting record in one sentence.\nRecord: {record}\nAnswer:"
    return Example(prompt, f"The {body} voted to {action} {topic}.")


def _code(rng: random.Random) -> Example:
    verbs = {"scale": "*", "shift": "+", "reduce": "-", "split": "//"}
    nouns = ["values", "prices", "scores", "sizes", "counts", "weights"]
    verb, noun = rng.choice(sorted(verbs)), rng.choice(nouns)
    item = noun[:-1]
    arg = rng.choice(["factor", "amount", "step", "k"])
    context = f"def {verb}_{noun}({noun}, {arg}):\n    result = []\n    for {item} in {noun}:"
    prompt = f"Complete the next line of the Python code.\n{context}\nAnswer:"
    return Example(prompt, f"        result.append({item} {verbs[verb]} {arg})")


_SIMPLE_WORDS = {
    "physician": "doctor",
    "purchased": "bought",
    "automobile": "car",
    "residence": "home",
    "commenced": "began",
    "assistance": "help",
    "sufficient": "enough",
    "numerous": "many",
    "inquired": "asked",
    "observed": "saw",
    "attempted": "tried",
    "terminated": "ended",
    "immediately": "at once",
    "approximately": "about",
    "construct": "build",
    "children": "kids",
}


def _simplify(rng: random.Random) -> Example:
    templates = [
        ("The {physician} {observed} {numerous} {children} near the {residence}.",),
        ("She {purchased} an {automobile} {immediately} after work.",),
        ("They {attempted} to {construct} a {residence} without {assistance}.",),
        ("The meeting {commenced} {approximately} at noon and {terminated} late.",),
        ("He {inquired} whether there was {sufficient} food for the {children}.",),
        ("The {physician} {terminated} the visit and {purchased} coffee.",),
        ("{numerous} people {observed} the {automobile} {immediately}.",),
    ]
    (template,) = rng.choice(templates)
    hard = template.format(**{w: w for w in _SIMPLE_WORDS})
    easy = template.format(**_SIMPLE_WORDS)
    hard, easy = hard[0].upper() + hard[1:], easy[0].upper() + easy[1:]
    prompt = f"Rewrite the sentence with simple words.\nSentence: {hard}\nAnswer:"
    return Example(prompt, easy)


GENERATORS: dict[str, tuple[Callable[[random.Random], Example], TaskSpec]] = {
    "sentiment": (_sentiment, TaskSpec("sentiment", "accuracy", 4)),
    "arith": (_arith, TaskSpec("arith", "accuracy", 6)),
    "minutes": (_minutes, TaskSpec("minutes", "rouge_l", 24)),
    "code": (_code, TaskSpec("code", "edit_similarity", 24)),
    "simplify": (_simplify, TaskSpec("simplify", "sari", 24)),
}


def write_mini_stream(root: Path, data_seed: int, sizes: dict[str, int]) -> None:
    """Generate every task's splits into ``root`` (deterministic in ``data_seed``)."""
    for name, (generate, _) in GENERATORS.items():
        rng = random.Random(derive_seed(data_seed, name))
        for split, n in sizes.items():
            records = [{"prompt": e.prompt, "answer": e.answer} for e in (generate(rng) for _ in range(n))]
            atomic_write(root / name / f"{split}.json", json.dumps(records, ensure_ascii=False, indent=1))


def mini_stream(
    cache_dir: str,
    data_seed: int = 0,
    order: Sequence[str] | None = None,
    epochs: int | Sequence[int] = 3,
    max_steps: int | Sequence[int] | None = None,
    num_train: int = 64,
    num_eval: int = 16,
    num_test: int = 32,
) -> TaskStream:
    """The embedded stream, written to ``cache_dir/seed<data_seed>-<sizes>`` and loaded from there.

    It is regenerated at every call (milliseconds), so files left by an older version of the
    templates are never reused; the atomic writes keep parallel jobs from reading half a file.
    """
    sizes = {"train": num_train, "eval": num_eval, "test": num_test}
    root = Path(cache_dir).expanduser() / f"seed{data_seed}-{num_train}-{num_eval}-{num_test}"
    write_mini_stream(root, data_seed, sizes)
    return load_stream(root, [spec for _, spec in GENERATORS.values()], order, epochs, max_steps)
