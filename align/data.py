"""Task data: loading and validating rows, turning them into conversations, and building the shipped data set.

Row shapes (the contract every stage relies on):

* math: ``{"prompt": str, "answer": str}`` (+ ``"solution"`` for SFT, the worked answer ending in ``\\boxed{N}``)
* code: ``{"prompt": str, "tests": str, "entry_point": str}`` or ``{"prompt": str, "io_cases": [{"stdin",
  "stdout"}, ...]}`` (+ ``"solution"`` for SFT, one fenced Python block)
* chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``

Other columns pass through untouched, so a reward function can ask for any of them by name.

``build_all`` regenerates ``data/``: the templated task sets (``align.tasks_math``, ``align.tasks_code``,
``align.tasks_chat``), a byte-level BPE tokenizer trained on them, and a data card.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from align.chat import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from align.chat import prompt_messages as _user_turn
from align.tasks_chat import chat_conversation
from align.tasks_code import check_row, code_task, fence
from align.tasks_math import MathConfig, math_problem

log = logging.getLogger(__name__)

KINDS = ("math", "code", "chat")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file or row that does not fit the row contract; the message says where and what."""


# --------------------------------------------------------------------------------------------------- validation


def _need_str(row: dict, key: str, allow_empty: bool = False) -> str:
    if key not in row:
        raise ValueError(f"missing field {key!r} (row has {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def validate_row(row: object, kind: str) -> dict:
    """Check one row against the contract for ``kind`` and return it normalized (math answers as strings).

    Raises ``ValueError`` saying what is wrong; ``load_rows`` adds the file and row number.
    """
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    # Columnar sources (parquet, datasets) fill a column a row does not use with None, e.g. io_cases on a
    # function task; treat those as absent.
    row = {k: v for k, v in row.items() if v is not None}
    if kind == "math":
        _need_str(row, "prompt")
        answer = row.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool):
            row["answer"] = str(answer)
        else:
            _need_str(row, "answer")
        if "solution" in row:
            _need_str(row, "solution")
    elif kind == "code":
        _need_str(row, "prompt")
        if "tests" in row or "entry_point" in row:
            _need_str(row, "tests")
            _need_str(row, "entry_point")
        elif "io_cases" in row:
            cases = row["io_cases"]
            if not isinstance(cases, list) or not cases:
                raise ValueError("field 'io_cases' must be a non-empty list of {stdin, stdout} objects")
            for i, case in enumerate(cases):
                if not isinstance(case, dict) or not all(isinstance(case.get(k), str) for k in ("stdin", "stdout")):
                    raise ValueError(f"io_cases[{i}] must be an object with string 'stdin' and 'stdout'")
        else:
            raise ValueError(f"a code row needs 'tests' and 'entry_point', or 'io_cases' (row has {sorted(row)})")
        if "solution" in row:
            _need_str(row, "solution")
    else:
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("field 'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] must be an object, got {type(m).__name__}")
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")
    return row


# ------------------------------------------------------------------------------------------------------ loading


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {n}: invalid JSON ({e.msg} at column {e.colno})") from None


def _table_rows(path: str, split: str) -> Iterator[tuple[int, object]]:
    """Rows of a parquet file, a saved ``datasets`` folder, a loadable local folder or file, or a hub id."""
    import datasets

    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif Path(path, "state.json").is_file() or Path(path, "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(path)
            rows = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        elif Path(path).is_file() and Path(path).suffix in (".json", ".csv"):
            rows = datasets.load_dataset(Path(path).suffix[1:], data_files=path, split="train")
        else:
            # "owner/name:config" picks a hub dataset's configuration (e.g. "openai/gsm8k:main"); hub ids
            # cannot contain ":", so the suffix is unambiguous.
            name, _, config = path.partition(":") if not Path(path).exists() else (path, "", "")
            rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear error naming the source
        raise DataError(f"cannot load {path!r} (split {split!r}): {type(e).__name__}: {e}") from e
    yield from enumerate(rows, start=1)


def load_rows(path: str | Path, kind: str, columns: dict[str, str] | None = None, split: str = "train",
              limit: int | None = None) -> list[dict]:
    """Load and validate task rows.

    ``path`` is a ``.jsonl`` file, a ``.parquet`` file, or else a ``datasets`` source read at ``split``: a hub
    id (``"openai/gsm8k:main"`` names a configuration), a local dataset folder, a folder saved with
    ``save_to_disk``, or a ``.json``/``.csv`` file.
    ``columns`` renames source columns to ours, e.g. ``{"question": "prompt"}``.  GSM8K-style math rows
    (``question`` + ``answer`` with ``#### N``) and HumanEval-style code rows (``test`` + ``entry_point``) are
    converted automatically (``from_gsm8k`` / ``from_humaneval``).  A bad row raises ``DataError`` naming the
    file and its 1-based row number.
    """
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    path = str(path)
    if path.endswith((".jsonl", ".parquet")) and not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    source = _jsonl_rows(Path(path)) if path.endswith(".jsonl") else _table_rows(path, split)
    out: list[dict] = []
    if limit is not None and limit <= 0:
        return out
    for n, raw in source:
        try:
            row = raw
            if columns and isinstance(row, dict):
                missing = [c for c in columns if c not in row]
                if missing:
                    raise ValueError(f"mapped column(s) {missing} not found (row has {sorted(row)})")
                row = {k: v for k, v in row.items() if k not in columns} | {columns[k]: row[k] for k in columns}
            if isinstance(row, dict) and kind == "math" and "prompt" not in row and "question" in row:
                row = from_gsm8k(row)
            elif isinstance(row, dict) and kind == "code" and "tests" not in row and "test" in row:
                row = from_humaneval(row)
            out.append(validate_row(row, kind))
        except ValueError as e:
            raise DataError(f"{path}: row {n}: {e}") from None
        if limit is not None and len(out) >= limit:
            break  # before reading further, so rows past the limit are never parsed
    return out


def from_gsm8k(row: dict) -> dict:
    """A GSM8K row (``question``, ``answer`` ending in ``#### N``) as a math row with a ``\\boxed{N}`` solution."""
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError("a GSM8K row needs string fields 'question' and 'answer'")
    if "####" not in answer:
        raise ValueError("GSM8K answer has no '#### N' final line")
    rationale, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    # <<48/2=24>> are calculator annotations for the original data's tool use, not part of the reasoning text.
    rationale = re.sub(r"<<[^>]*>>", "", rationale).strip()
    solution = f"{rationale}\n\\boxed{{{final}}}" if rationale else f"\\boxed{{{final}}}"
    extra = {k: v for k, v in row.items() if k not in ("question", "answer")}
    return extra | {"prompt": question, "answer": final, "solution": solution}


def from_humaneval(row: dict) -> dict:
    """A HumanEval row (``task_id, prompt, test, entry_point``) as a code row with asserts that call ``check``."""
    for key in ("prompt", "test", "entry_point"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"a HumanEval row needs a string field {key!r}")
    entry = row["entry_point"]
    # The chat policy answers with a whole fenced program, so the stub is shown as code to complete.
    out = {k: v for k, v in row.items() if k not in ("prompt", "test", "canonical_solution")}
    out |= {"prompt": f"Complete the following Python code:\n{fence(row['prompt'])}",
            "tests": f"{row['test']}\ncheck({entry})", "entry_point": entry}
    if isinstance(row.get("canonical_solution"), str):
        out["solution"] = fence(row["prompt"] + row["canonical_solution"])
    return out


# ------------------------------------------------------------------------------------------------ conversations


def to_messages(row: dict, kind: str) -> list[dict]:
    """The SFT conversation for a row: user prompt + assistant solution (math, code) or the messages (chat).

    A math row without ``solution`` trains on the bare ``\\boxed{answer}``; a code row needs its ``solution``.
    """
    if kind == "chat":
        return row["messages"]
    if kind == "math":
        solution = row.get("solution") or f"\\boxed{{{row['answer']}}}"
    elif kind == "code":
        if not row.get("solution"):
            raise DataError(f"code row has no 'solution' to train on: {row['prompt'][:60]!r}")
        solution = row["solution"]
    else:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    return _user_turn(row["prompt"]) + [{"role": "assistant", "content": solution}]


def prompt_messages(row: dict) -> list[dict]:
    """The conversation to generate from: the user prompt, or a chat row's messages before its last reply."""
    if "prompt" in row:
        return _user_turn(row["prompt"])
    messages = list(row["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


# -------------------------------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _plain_template():
    import jinja2

    # The {% generation %} marks are a transformers extension; plain Jinja needs them gone.
    source = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return jinja2.Environment().from_string(source)


def _raise_exception(message: str):
    raise ValueError(message)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template rendered as text, without a tokenizer (used to build the tokenizer's corpus)."""
    return _plain_template().render(messages=messages, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                    add_generation_prompt=add_generation_prompt, raise_exception=_raise_exception)


def train_tokenizer(texts: list[str], vocab_size: int = 1024, progress: bool = False):
    """A byte-level BPE tokenizer with one token per digit, the chat special tokens and the chat template.

    ``texts`` are rendered conversations; special tokens in them are cut out before training, as the tokenizer
    does at encode time, so BPE never learns their pieces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # The generation prompt ends in "Assistant: " with a trailing space. Isolating that prefix keeps the
        # space out of the reply's first token, so prompt + completion tokenizes exactly like the rendered
        # conversation, and the assistant mask starts on a token boundary.
        pre_tokenizers.Split(Regex("Assistant: "), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    specials = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    pieces = [p for text in texts for p in specials.split(text) if p]
    tok.train_from_iterator(pieces, trainer, length=len(pieces))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        # decode(encode(x)) must give x back exactly (code indentation, "a ." in prose).
        clean_up_tokenization_spaces=False,
    )


# -------------------------------------------------------------------------------------------------------- build


def _distinct(draw: Callable[[], dict], n: int, key: Callable[[dict], str], what: str, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    rows: list[dict] = []
    seen: set[str] = set()
    budget = 50 * n + 1000  # templated spaces are finite; fail clearly instead of spinning
    with tqdm(total=n, desc=what, disable=not progress, leave=False) as bar:
        for _ in range(budget):
            if len(rows) == n:
                break
            row = draw()
            if (k := key(row)) not in seen:
                seen.add(k)
                rows.append(row)
                bar.update()
    if len(rows) < n:
        raise DataError(f"only {len(rows)} distinct {what} after {budget} draws; ask for fewer")
    return rows


def _split(rows: list[dict], n_heldout: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    rows = list(rows)
    rng.shuffle(rows)
    return rows[n_heldout:], rows[:n_heldout]


def generate(seed: int = 0, *, math_train: int = 6000, math_heldout: int = 200, code_train: int = 1500,
             code_heldout: int = 100, chat_train: int = 500, math_config: MathConfig = MathConfig(),
             io_share: float = 0.25, progress: bool = False) -> dict[str, list[dict]]:
    """All task rows, keyed ``"math/train"``, ``"math/heldout"``, ``"code/train"``, ... (deterministic in ``seed``).

    Each kind draws from its own seeded stream, so changing one kind's size leaves the others' files unchanged.
    Rows are distinct by prompt (chat: by whole conversation) before the train/held-out split, so the splits
    never share a prompt.
    """
    if not 0.0 <= io_share <= 1.0:
        raise ValueError(f"io_share must be in [0, 1], got {io_share}")
    by_prompt = lambda r: r["prompt"]  # noqa: E731
    out: dict[str, list[dict]] = {}

    rng = random.Random(f"math:{seed}")
    rows = _distinct(lambda: math_problem(rng, math_config), math_train + math_heldout, by_prompt, "math problems",
                     progress)
    out["math/train"], out["math/heldout"] = _split(rows, math_heldout, rng)

    rng = random.Random(f"code:{seed}")
    total = code_train + code_heldout
    n_io = round(io_share * total)
    rows = (_distinct(lambda: code_task(rng, io=False), total - n_io, by_prompt, "function tasks", progress)
            + _distinct(lambda: code_task(rng, io=True), n_io, by_prompt, "program tasks", progress))
    for row in rows:
        check_row(row)  # a reference that fails its own tests would teach and reward the wrong thing
    out["code/train"], out["code/heldout"] = _split(rows, code_heldout, rng)

    rng = random.Random(f"chat:{seed}")
    out["chat/train"] = _distinct(lambda: chat_conversation(rng), chat_train,
                                  lambda r: json.dumps(r, sort_keys=True), "chat conversations", progress)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, "\\n" line ends on every platform (the bytes are part of the contract)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _token_stats(tok, rows: list[dict], kind: str) -> dict:
    if not rows:
        return {}
    if kind == "chat":
        lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                   for r in rows]
        return {"conversation_tokens_mean": round(sum(lengths) / len(lengths), 1), "conversation_tokens_max":
                max(lengths)}
    prompts = [len(ids) for ids in tok([r["prompt"] for r in rows])["input_ids"]]
    solutions = [len(ids) for ids in tok([r["solution"] for r in rows])["input_ids"]]
    return {"prompt_tokens_mean": round(sum(prompts) / len(prompts), 1), "prompt_tokens_max": max(prompts),
            "solution_tokens_mean": round(sum(solutions) / len(solutions), 1), "solution_tokens_max": max(solutions)}


BUILT = ("math", "code", "chat", "tokenizer", "manifest.json", "README.md")


def build_all(out_dir: str | Path, seed: int = 0, *, force: bool = False, math_train: int = 6000,
              math_heldout: int = 200, code_train: int = 1500, code_heldout: int = 100, chat_train: int = 500,
              vocab_size: int = 1024, math_config: MathConfig = MathConfig(), io_share: float = 0.25,
              progress: bool = True) -> dict:
    """Generate the task sets, train the tokenizer and write them with a data card under ``out_dir``.

    Writes ``math/{train,heldout}.jsonl``, ``code/{train,heldout}.jsonl``, ``chat/train.jsonl``, ``tokenizer/``,
    ``manifest.json`` (sizes, sha256 of every file) and ``README.md`` (the data card).  Everything is written to
    a temporary folder inside ``out_dir`` first and moved into place at the end; existing outputs are kept
    unless ``force``.  Returns the summary that ``manifest.json`` holds.
    """
    out_dir = Path(out_dir)
    existing = [name for name in BUILT if (out_dir / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; pass force=True (--force) to "
                              "replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = dict(seed=seed, math_train=math_train, math_heldout=math_heldout, code_train=code_train,
                code_heldout=code_heldout, chat_train=chat_train, vocab_size=vocab_size, io_share=io_share,
                math_config=dataclasses.asdict(math_config))
    log.info("generating task rows (seed %d)", seed)
    sets = generate(seed, math_train=math_train, math_heldout=math_heldout, code_train=code_train,
                    code_heldout=code_heldout, chat_train=chat_train, math_config=math_config, io_share=io_share,
                    progress=progress)

    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    try:
        for name, rows in sets.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        log.info("training a %d-token byte-level BPE tokenizer", vocab_size)
        texts = [render_chat(to_messages(r, name.split("/")[0])) for name, rows in sets.items() for r in rows]
        tok = train_tokenizer(texts, vocab_size=vocab_size, progress=progress)
        tok.save_pretrained(tmp / "tokenizer")
        summary = {
            "args": args,
            "counts": {name: len(rows) for name, rows in sets.items()},
            "code_io_share": {name: round(sum("io_cases" in r for r in sets[name]) / max(1, len(sets[name])), 3)
                              for name in ("code/train", "code/heldout")},
            "tokenizer": {"vocab_size": len(tok)},
            "tokens": {kind: _token_stats(tok, sets[f"{kind}/train"], kind) for kind in KINDS},
            "sha256": {p.relative_to(tmp).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / "manifest.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(render_card(summary, sets), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The swap moves each old output aside before moving the new one in; if it fails half-way, the old copies
    # stay in the temporary folder rather than being deleted.
    old = tmp / "old"
    old.mkdir()
    try:
        for name in BUILT:
            if (out_dir / name).exists():
                (out_dir / name).rename(old / name)
            (tmp / name).rename(out_dir / name)
    except OSError as e:
        raise DataError(f"could not move the new data into {out_dir} ({e}); previous outputs are in {old}") from e
    shutil.rmtree(tmp)
    log.info("wrote %s", ", ".join(f"{k}: {v}" for k, v in summary["counts"].items()))
    return summary


# ---------------------------------------------------------------------------------------------------- data card


def _example(row: dict) -> str:
    return "```json\n" + json.dumps(row, ensure_ascii=False, indent=1) + "\n```"


def render_card(summary: dict, sets: dict[str, list[dict]]) -> str:
    """The data card (README.md) for a build, with the sizes and token counts measured on it."""
    a, c, t = summary["args"], summary["counts"], summary["tokens"]
    m = a["math_config"]
    return f"""# Task data

Synthetic, templated task sets and the tokenizer for the tiny CPU pipeline.  Everything here is generated;
regenerate it (byte-identical for the same seed and package versions) with

```
align data build --out data --seed {a["seed"]} --force
```

`manifest.json` records the build arguments, row counts, token statistics and the sha256 of every file.

| path | rows | holds |
|---|---|---|
| `math/train.jsonl` | {c["math/train"]} | arithmetic word problems `{{"prompt", "answer", "solution"}}` |
| `math/heldout.jsonl` | {c["math/heldout"]} | same distribution, prompts disjoint from train (`heldout_math_*`) |
| `code/train.jsonl` | {c["code/train"]} | Python tasks `{{"prompt", "solution", "tests", "entry_point"}}` or \
`{{"prompt", "solution", "io_cases"}}` |
| `code/heldout.jsonl` | {c["code/heldout"]} | same distribution, prompts disjoint from train |
| `chat/train.jsonl` | {c["chat/train"]} | short conversations `{{"messages": [{{"role", "content"}}, ...]}}` |
| `tokenizer/` | | byte-level BPE, {summary["tokenizer"]["vocab_size"]} tokens, DeepSeek-V2 chat template |

Load rows with `align.data.load_rows(path, kind)`; it validates every row and names the file and row number
of a bad one.  SFT turns a row into a conversation with `align.data.to_messages(row, kind)`.

## Math (`align/tasks_math.py`)

Multi-step integer word problems: one person's items changing over a few events (buys, gives away, doubles,
containers of N), two people compared ("3 more than", "4 times as many") and added up, and shop purchases
(price times quantity, change from a bill, a two-item total).  Names, objects, verbs and question wording are
drawn from fixed lists.

- Difficulty: {m["min_steps"]}-{m["max_steps"]} operations of `+ - *`, operands up to {m["max_operand"]},
  every intermediate value non-negative and below {m["max_value"]}.
- `solution`, the SFT target, is one equation per operation, then the answer boxed: `7 + 5 = 12. 12 - 3 = 9.
  \\boxed{{9}}`.  `answer` is the bare integer as a string; the math reward compares against it.
- Tokens (train): prompt mean {t["math"]["prompt_tokens_mean"]}, max {t["math"]["prompt_tokens_max"]};
  solution mean {t["math"]["solution_tokens_mean"]}, max {t["math"]["solution_tokens_max"]}.

{_example(sets["math/train"][0])}

## Code (`align/tasks_code.py`)

Short Python tasks from templated families (arithmetic with a constant, powers, parity and divisibility,
list sum/max/min/length/first/last, filtering and counting in lists, string reversal/counting/upper case,
repetition, factorial, sum to n, FizzBuzz-style words, max/min/sum of two, clamp, absolute value), with
varied function names, parameter names, constants and wording.

- Function tasks carry `tests`, HumanEval-style `assert` lines calling `entry_point`.  Program tasks (share
  {summary["code_io_share"]["code/train"]:.0%} in train, {a["io_share"]:.0%} requested) read stdin and print;
  `io_cases` lists `{{"stdin", "stdout"}}` pairs, compared exactly.
- The expected values come from a Python reference written separately from the solution code, and every
  reference `solution` (one fenced ```` ```python ```` block) is run against its own tests during the build.
- Tokens (train): prompt mean {t["code"]["prompt_tokens_mean"]}, max {t["code"]["prompt_tokens_max"]};
  solution mean {t["code"]["solution_tokens_mean"]}, max {t["code"]["solution_tokens_max"]}.

{_example(sets["code/train"][0])}

## Chat (`align/tasks_chat.py`)

One to three user turns, sometimes under a short system prompt: greetings and thanks, facts from a fixed
table (capitals, everyday facts), unit conversions (km/m, hours/minutes, kg/g, ...) and polite refusals of
harmful requests.  Train only; there is no held-out chat set.

- Tokens: whole conversation (chat template included) mean {t["chat"]["conversation_tokens_mean"]}, max
  {t["chat"]["conversation_tokens_max"]}.

{_example(sets["chat/train"][0])}

## Tokenizer (`tokenizer/`)

A byte-level BPE (`tokenizers`) trained on every conversation above rendered through the chat template of
`align/chat.py`, saved with `save_pretrained`; load it with `AutoTokenizer.from_pretrained("data/tokenizer")`.

- {summary["tokenizer"]["vocab_size"]} tokens including the specials `{BOS_TOKEN}` (bos), `{EOS_TOKEN}` (eos) and
  `{PAD_TOKEN}` (pad).  Byte-level, so any text encodes, and it decodes back exactly.
- Pre-tokenization: the prefix `Assistant: ` is isolated, then digits are split one per token, then the GPT-2
  byte-level rules.  One token per digit lets a small model do arithmetic digit by digit; isolating the
  assistant prefix makes prompt + completion tokenize exactly like the rendered conversation.
- Plain `tok(text)` adds no BOS; the chat template adds it.  `apply_chat_template(...,
  return_assistant_tokens_mask=True)` marks exactly the assistant replies and their EOS.

## Splits and reproducibility

- Rows of a kind are drawn until the requested number of distinct prompts (chat: distinct conversations) is
  reached, shuffled, then split, so train and held-out never share a prompt.
- Each kind has its own random stream seeded from `seed` (`random.Random("math:<seed>")`, ...), so changing
  one kind's size leaves the other files unchanged.

## Limitations

Synthetic, English-only and narrow on purpose: the sets exist to make a ~1M-parameter model's SFT and GRPO
stages measurable in minutes on a CPU.  Scores on them say nothing about general math or coding ability;
use GSM8K / HumanEval for that (`load_rows("openai/gsm8k:main", "math", split="test")` and
`load_rows("openai/openai_humaneval", "code", split="test")` convert them).
"""
