"""Task data: determinism, splits, validation errors, loaders, tokenizer, reference solutions, conversions."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from align.chat import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN
from align.data import (DataError, build_all, from_gsm8k, from_humaneval, generate, load_rows,
                        prompt_messages, to_messages, write_jsonl)
from align.tasks_math import MathConfig, math_problem

SHIPPED = Path(__file__).resolve().parents[2] / "data"
SMALL = dict(math_train=120, math_heldout=30, code_train=60, code_heldout=20, chat_train=20, progress=False)
FILES = ["math/train.jsonl", "math/heldout.jsonl", "code/train.jsonl", "code/heldout.jsonl", "chat/train.jsonl"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "a"
    build_all(out, seed=0, **SMALL)
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------- build


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    build_all(tmp_path / "b", seed=0, **SMALL)
    assert _tree(built) == _tree(tmp_path / "b")
    build_all(tmp_path / "c", seed=1, **SMALL)
    other = _tree(tmp_path / "c")
    for name in FILES:
        assert other[name] != _tree(built)[name], name


def test_build_writes_everything_and_refuses_to_clobber(built, tmp_path):
    assert {p for p in _tree(built)} >= set(FILES) | {"tokenizer/tokenizer.json", "manifest.json", "README.md"}
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["counts"] == {"math/train": 120, "math/heldout": 30, "code/train": 60, "code/heldout": 20,
                                  "chat/train": 20}

    out = tmp_path / "d"
    build_all(out, seed=0, **SMALL)
    before = _tree(out)
    with pytest.raises(FileExistsError, match="force"):
        build_all(out, seed=1, **SMALL)
    assert _tree(out) == before
    build_all(out, seed=1, force=True, **SMALL)
    assert _tree(out) != before
    assert not list(out.glob(".build-*")), "temporary build folder left behind"


def test_splits_are_disjoint_and_distinct(built):
    for root in (built, SHIPPED):
        for kind in ("math", "code"):
            train = [r["prompt"] for r in load_rows(root / kind / "train.jsonl", kind)]
            heldout = [r["prompt"] for r in load_rows(root / kind / "heldout.jsonl", kind)]
            assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
            assert not set(train) & set(heldout), f"{root}/{kind}: a prompt is in both splits"


def test_shipped_data_matches_its_manifest():
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert manifest["args"]["seed"] == 0
    for name in FILES:
        kind = name.split("/")[0]
        assert len(load_rows(SHIPPED / name, kind)) == manifest["counts"][name.removesuffix(".jsonl")]
    assert manifest["counts"] == {"math/train": 6000, "math/heldout": 200, "code/train": 1500,
                                  "code/heldout": 100, "chat/train": 500}
    code = load_rows(SHIPPED / "code/train.jsonl", "code")
    assert 0.2 < sum("io_cases" in r for r in code) / len(code) < 0.3


def test_shipped_rows_are_what_the_generators_make_today(tmp_path):
    """Catches a generator change without `align data build --out data --seed 0 --force` (rows only: cheap)."""
    sets = generate(0)
    for name, rows in sets.items():
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (SHIPPED / f"{name}.jsonl").read_bytes(), name


# -------------------------------------------------------------------------------------------------- generators


def test_math_solutions_are_correct_and_within_limits():
    rng = random.Random(0)
    for cfg in (MathConfig(), MathConfig(min_steps=1, max_steps=5, max_operand=20, max_value=500)):
        for _ in range(300):
            row = math_problem(rng, cfg)
            *equations, boxed = row["solution"].split(". ")
            assert boxed == f"\\boxed{{{row['answer']}}}"
            assert cfg.min_steps <= len(equations) <= cfg.max_steps
            for eq in equations:
                lhs, rhs = eq.rstrip(".").split(" = ")
                assert eval(lhs) == int(rhs) and 0 <= int(rhs) < cfg.max_value, row  # noqa: S307 - our own text
            assert equations[-1].rstrip(".").endswith(f"= {row['answer']}")


def test_math_config_rejects_impossible_knobs():
    with pytest.raises(ValueError, match="min_steps"):
        MathConfig(min_steps=3, max_steps=2)


HARNESS = textwrap.dedent('''
    import contextlib, io, json, sys
    failures = []
    for path in sys.argv[1:]:
        for n, line in enumerate(open(path), 1):
            row = json.loads(line)
            code = row["solution"].split("```python\\n", 1)[1].rsplit("```", 1)[0]
            try:
                if "tests" in row:
                    exec(code + "\\n" + row["tests"], {})
                else:
                    for case in row["io_cases"]:
                        out, sys.stdin = io.StringIO(), io.StringIO(case["stdin"])
                        with contextlib.redirect_stdout(out):
                            exec(code, {"__name__": "__main__"})
                        assert out.getvalue() == case["stdout"], (case, out.getvalue())
            except BaseException as e:
                failures.append(f"{path}:{n}: {type(e).__name__}: {e}")
    print("\\n".join(failures[:20]))
    sys.exit(1 if failures else 0)
''')


def test_every_shipped_reference_solution_passes_its_tests(tmp_path):
    files = [str(SHIPPED / "code/train.jsonl"), str(SHIPPED / "code/heldout.jsonl")]
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    result = subprocess.run([sys.executable, str(script), *files], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------- loading


def test_jsonl_errors_name_file_and_row(tmp_path):
    good = json.dumps({"prompt": "p", "answer": "1"})
    cases = {
        "bad_json.jsonl": ([good, good, "{not json"], "row 3: invalid JSON"),
        "missing.jsonl": ([good, json.dumps({"prompt": "p"})], "row 2: missing field 'answer'"),
        "bad_type.jsonl": ([json.dumps({"prompt": "p", "answer": [1]})], "row 1: field 'answer' must be a string"),
        "not_object.jsonl": ([good, "[1, 2]"], "row 2: a row must be a JSON object"),
    }
    for name, (lines, message) in cases.items():
        path = _lines_file(tmp_path / name, lines)
        with pytest.raises(DataError, match=message) as info:
            load_rows(path, "math")
        assert str(path) in str(info.value)
    # blank lines are skipped but still counted, so the number matches what an editor shows
    path = _lines_file(tmp_path / "blank.jsonl", [good, "", json.dumps({"prompt": 3, "answer": "1"})])
    with pytest.raises(DataError, match=r"row 3: field 'prompt' must be a string, got int"):
        load_rows(path, "math")


def test_code_and_chat_validation(tmp_path):
    ok = [{"prompt": "p", "tests": "assert f() == 1", "entry_point": "f"},
          {"prompt": "p", "io_cases": [{"stdin": "1\n", "stdout": "2\n"}]}]
    assert len(load_rows(_lines_file(tmp_path / "ok.jsonl", [json.dumps(r) for r in ok]), "code")) == 2
    bad = {
        "code": [({"prompt": "p", "tests": "assert f() == 1"}, "missing field 'entry_point'"),
                 ({"prompt": "p"}, "needs 'tests' and 'entry_point', or 'io_cases'"),
                 ({"prompt": "p", "io_cases": [{"stdin": 1, "stdout": "2"}]}, r"io_cases\[0\]")],
        "chat": [({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\]\.role"),
                 ({"messages": [{"role": "user", "content": None}]}, r"messages\[0\]\.content"),
                 ({"messages": []}, "non-empty list")],
    }
    for kind, rows in bad.items():
        for i, (row, message) in enumerate(rows):
            path = _lines_file(tmp_path / f"{kind}{i}.jsonl", [json.dumps(row)])
            with pytest.raises(DataError, match=f"{kind}{i}.jsonl: row 1: .*{message}"):
                load_rows(path, kind)


def test_missing_file_and_unknown_kind(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_rows(tmp_path / "nope.jsonl", "math")
    with pytest.raises(DataError, match="nope.parquet: no such file"):
        load_rows(tmp_path / "nope.parquet", "math")
    with pytest.raises(DataError, match="unknown data kind 'poetry'"):
        load_rows(SHIPPED / "math/heldout.jsonl", "poetry")
    with pytest.raises(DataError, match="cannot load"):
        load_rows(tmp_path / "no_such_dataset_dir", "math")


def test_parquet_with_column_mapping_and_limit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "math.parquet"
    pq.write_table(pa.table({"question": ["1 + 1?", "2 + 2?", "3 + 3?"], "final": [2, 4, 6],
                             "source": ["a", "b", "c"]}), path)
    rows = load_rows(path, "math", columns={"question": "prompt", "final": "answer"})
    assert rows[0] == {"source": "a", "prompt": "1 + 1?", "answer": "2"}
    assert len(load_rows(path, "math", columns={"question": "prompt", "final": "answer"}, limit=2)) == 2
    with pytest.raises(DataError, match=r"math.parquet: row 1: mapped column\(s\) \['q'\] not found"):
        load_rows(path, "math", columns={"q": "prompt"})

    # a columnar code table holds both task shapes, with nulls in the columns a row does not use
    code = tmp_path / "code.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "f", "tests": "assert f() == 1", "entry_point": "f", "io_cases": None},
        {"prompt": "g", "tests": None, "entry_point": None, "io_cases": [{"stdin": "1\n", "stdout": "1\n"}]},
    ]), code)
    rows = load_rows(code, "code")
    assert "io_cases" not in rows[0] and "tests" not in rows[1]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": [1.5, 2.5]}), bad)
    with pytest.raises(DataError, match="bad.parquet: row 1: field 'answer' must be a string, got float"):
        load_rows(bad, "math")


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "1 + 2?", "answer": "3"}]).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(tmp_path / "ds", "math") == [{"prompt": "1 + 2?", "answer": "3"}]


# ------------------------------------------------------------------------------------------------- conversions


def test_from_gsm8k_and_auto_conversion(tmp_path):
    row = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all she sold 48+24 = <<48+24=72>>72 "
                     "clips.\n#### 1,072"}
    out = from_gsm8k(row)
    assert out["prompt"] == row["question"] and out["answer"] == "1072"
    assert "<<" not in out["solution"] and out["solution"].endswith("\\boxed{1072}")
    path = _lines_file(tmp_path / "gsm8k.jsonl", [json.dumps(row)])
    assert load_rows(path, "math")[0]["answer"] == "1072"
    with pytest.raises(DataError, match="gsm8k_bad.jsonl: row 1: .*'#### N'"):
        load_rows(_lines_file(tmp_path / "gsm8k_bad.jsonl", [json.dumps({"question": "q", "answer": "3"})]),
                  "math")


def test_from_humaneval_tests_run_against_canonical_solution(tmp_path):
    row = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
           "canonical_solution": "    return a + b\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"}
    out = from_humaneval(row)
    assert out["tests"] == row["test"] + "\ncheck(add)" and out["entry_point"] == "add"
    assert out["task_id"] == "HumanEval/0" and "def add(a, b):" in out["prompt"]
    code = out["solution"].removeprefix("```python\n").removesuffix("\n```")
    subprocess.run([sys.executable, "-c", code + "\n" + out["tests"]], check=True, timeout=30)
    path = _lines_file(tmp_path / "he.jsonl", [json.dumps(row)])
    assert load_rows(path, "code")[0]["tests"].endswith("check(add)")


def test_messages():
    math = {"prompt": "1 + 1?", "answer": "2", "solution": "1 + 1 = 2. \\boxed{2}"}
    assert to_messages(math, "math") == [{"role": "user", "content": "1 + 1?"},
                                         {"role": "assistant", "content": "1 + 1 = 2. \\boxed{2}"}]
    assert to_messages({"prompt": "1 + 1?", "answer": "2"}, "math")[1]["content"] == "\\boxed{2}"
    assert prompt_messages(math) == [{"role": "user", "content": "1 + 1?"}]
    with pytest.raises(DataError, match="no 'solution'"):
        to_messages({"prompt": "p", "tests": "t", "entry_point": "f"}, "code")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert to_messages(chat, "chat") == chat["messages"]
    assert prompt_messages(chat) == chat["messages"][:1]


# --------------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHIPPED / "tokenizer")


def test_tokenizer_basics_and_round_trip(tok):
    assert len(tok) <= 1024
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    texts = [r["prompt"] + "\n" + r["solution"] for name in ("math/heldout.jsonl", "code/heldout.jsonl")
             for r in load_rows(SHIPPED / name, name.split("/")[0])]
    texts += ["def f(x):\n\tif x  >  10 :\n        return 'é ✓ 中'\n", "a .  b\n\n  c", "12345 + 0.5 = -7"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.bos_token_id not in ids
        assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok("12 + 345 = 357")["input_ids"])
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == list("12345357")


def test_assistant_mask_covers_exactly_the_replies(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Mia has 7 apples. She buys 5 more. How many?"},
                {"role": "assistant", "content": "7 + 5 = 12. \\boxed{12}"}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [tok.decode(s) for s in spans] == ["Hello! How can I help?" + EOS_TOKEN,
                                              "7 + 5 = 12. \\boxed{12}" + EOS_TOKEN]
    # The generation prompt is a token-exact prefix of the rendered conversation.
    prompt = tok.apply_chat_template(messages[:4], tokenize=True, return_dict=True,
                                     add_generation_prompt=True)["input_ids"]
    assert ids[:len(prompt)] == prompt and all(mask[len(prompt):])
    assert tok(messages[-1]["content"])["input_ids"] + [tok.eos_token_id] == ids[len(prompt):]
