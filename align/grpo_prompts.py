"""GRPO's training prompts: rows of the recipe's files and endless generated streams.

``data.generate`` draws fresh problems every step from the generator that built ``data/`` (so training reward
estimates held-out reward), never one of the excluded files' prompts; dynamic sampling refills from the same streams.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from typing import Literal

from datasets import Dataset

from align.chat import prompt_messages
from align.data import DataError, load_rows
from align.recipe import DataSource
from align.task_stream import math_config_of, prompts_of, take, task_stream

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GeneratedSource:
    kind: Literal["math", "code"] = dataclasses.field(metadata={"help": "which task generator draws the prompts"})
    seed: int = dataclasses.field(metadata={"help": "fixes the stream; a run's refills continue the same stream"})
    exclude: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "files whose prompts the stream never yields (held-out, validation)"})
    rows: int | None = dataclasses.field(
        default=None, metadata={"help": "prompts to draw; null: enough that every step sees fresh ones "
                                        "(trainer.max_steps x prompts per step, split by weight)"})
    weight: float = dataclasses.field(default=1.0, metadata={"help": "share of the drawn prompts"})
    math_config: dict = dataclasses.field(
        default_factory=dict, metadata={"help": "difficulty knobs (align.tasks_math.MathConfig); {} = the shipped "
                                                "data's"})


@dataclasses.dataclass
class GRPOData:
    train: list[DataSource] = dataclasses.field(
        default_factory=list, metadata={"help": "prompt files (math and/or code rows)"})
    generate: list[GeneratedSource] = dataclasses.field(
        default_factory=list, metadata={"help": "endless generated prompts, disjoint from the files excluded"})

    def __post_init__(self):
        if not self.train and not self.generate:
            raise ValueError("give prompt files (`train`) or generated prompts (`generate`), or both")


def prompt_row(row: dict) -> dict:
    """A task row as GRPO's dataset holds it: chat-formatted prompt plus every column a reward may read."""
    return {"prompt": prompt_messages(row["prompt"]), "answer": row.get("answer"), "tests": row.get("tests"),
            "entry_point": row.get("entry_point"), "io_cases": row.get("io_cases")}


class PromptSource:
    """The training prompts: rows of the recipe's files plus draws from its generated streams, and an endless
    refill (for dynamic sampling) that continues the streams, or cycles the files in a fresh order."""

    def __init__(self, data: GRPOData, needed: int | None, seed: int):
        self.files = [row for src in data.train
                      for row in load_rows(src.path, src.kind, columns=src.columns or None, split=src.split,
                                           limit=src.limit)]
        self.streams = []
        total_weight = sum(g.weight for g in data.generate)
        self.drawn: list[dict] = []
        for g in data.generate:
            stream = task_stream(g.kind, g.seed, exclude=prompts_of(g.exclude, g.kind),
                                 math_config=math_config_of(g.math_config))
            n = g.rows
            if n is None:
                if needed is None:
                    raise DataError("data.generate: set `rows` (the run has no trainer.max_steps to size it by)")
                n = math.ceil(needed * g.weight / total_weight)
            self.drawn += take(stream, n)
            self.streams.append((stream, g.weight))
        self.seed = seed
        log.info("training prompts: %d from files, %d generated (%s)", len(self.files), len(self.drawn),
                 ", ".join(f"{g.kind} seed {g.seed}" for g in data.generate) or "none")

    def dataset(self) -> Dataset:
        return Dataset.from_list([prompt_row(r) for r in self.files + self.drawn])

    def refill(self):
        """Endless prompt rows for dynamic sampling's replacement groups (streams first, else the files)."""
        rng = random.Random(f"refill:{self.seed}")
        if self.streams:
            streams, weights = zip(*self.streams)
            while True:
                yield prompt_row(next(rng.choices(streams, weights=weights)[0]))
        while True:
            order = list(range(len(self.files)))
            rng.shuffle(order)
            for i in order:
                yield prompt_row(self.files[i])
