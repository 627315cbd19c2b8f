"""Recipes: every shipped YAML validates; bad recipes fail early naming file and key; locks re-run."""

from pathlib import Path

import pytest
import yaml

from align import recipe
from align.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def _import_stages():
    import importlib

    for mod in ("align.sft", "align.grpo", "align.reward_model", "align.pipeline"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    _import_stages()
    if path.parent.name == "accelerate":
        from accelerate.commands.config.config_args import ClusterConfig

        cfg = ClusterConfig.from_yaml_file(str(path))
        assert cfg.num_processes >= 1
        return
    loaded = recipe.load(recipe.stage_of(path), path)
    assert loaded.recipe.output_dir and len(loaded.sha256) == 64


def test_recipes_found():
    assert any(p.name == "sft.yaml" for p in RECIPES)


@pytest.fixture
def sft_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load((ROOT / "recipes/tiny/sft.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "out")

    def write(mutate=None):
        data = yaml.safe_load(yaml.safe_dump(raw))
        if mutate:
            mutate(data)
        p = tmp_path / "sft.yaml"
        p.write_text(yaml.safe_dump(data))
        return p

    return write


def test_unknown_key_names_file_and_key(sft_yaml):
    p = sft_yaml(lambda d: d["model"].update(presett="tiny"))
    with pytest.raises(recipe.RecipeError, match=r"model\.presett: unknown key"):
        recipe.load("sft", p)


def test_unknown_trainer_key_names_trl_config(sft_yaml):
    p = sft_yaml(lambda d: d["trainer"].update(learning_rat=1.0))
    with pytest.raises(recipe.RecipeError, match=rf"{p}: trainer\.learning_rat: not an option of trl\.SFTConfig"):
        recipe.load("sft", p)


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d.update(seed="zero"), r"sft\.yaml: seed: expected an integer"),
    (lambda d: d["trainer"].update(num_train_epochs="many"), r"trainer\.num_train_epochs: expected a number"),
    (lambda d: d["trainer"].update(bf16="no"), r"trainer\.bf16: expected true/false"),
    (lambda d: d["data"]["train"][0].update(kind="poetry"), r"data\.train\[0\]\.kind: expected one of"),
    (lambda d: d["eval"].update(samples=2.5), r"eval\.samples: expected an integer"),
])
def test_wrong_type_names_key(sft_yaml, mutate, key):
    with pytest.raises(recipe.RecipeError, match=key):
        recipe.load("sft", sft_yaml(mutate))


def test_missing_data_file_fails_before_work(sft_yaml, tmp_path):
    p = sft_yaml(lambda d: d["data"]["train"][0].update(path="data/math/nope.jsonl"))
    with pytest.raises(recipe.RecipeError, match=r"data\.train\[0\]\.path: file not found: data/math/nope\.jsonl"):
        recipe.load("sft", p)
    assert not (tmp_path / "out").exists()


def test_missing_required_key(sft_yaml):
    with pytest.raises(recipe.RecipeError, match=r"sft\.yaml: eval: required key is missing"):
        recipe.load("sft", sft_yaml(lambda d: d.pop("eval")))


def test_cli_reports_bad_recipe_and_exits_2(sft_yaml, capsys):
    p = sft_yaml(lambda d: d["model"].update(colour="red"))
    assert main(["sft", "--config", str(p)]) == 2
    assert "model.colour: unknown key" in capsys.readouterr().err


def test_dotted_overrides(sft_yaml):
    p = sft_yaml()
    loaded = recipe.load("sft", p, ["trainer.learning_rate=1e-3", "eval.samples=2", "model.overrides.hidden_size=64"])
    assert loaded.recipe.trainer["learning_rate"] == 1e-3
    assert loaded.recipe.eval.samples == 2
    assert loaded.recipe.model.overrides == {"hidden_size": 64}
    base = recipe.load("sft", p)
    assert base.sha256 != loaded.sha256
    with pytest.raises(recipe.RecipeError, match=r"trainer\.nonsense: not an option"):
        recipe.load("sft", p, ["trainer.nonsense=1"])


def test_lock_round_trip_and_drift(sft_yaml, tmp_path, monkeypatch):
    p = sft_yaml()
    loaded = recipe.load("sft", p, ["trainer.learning_rate=5e-4"])
    lock = recipe.write_lock(loaded, tmp_path / "run")
    data = yaml.safe_load(lock.read_text())
    assert data["sha256"] == loaded.sha256 and data["stage"] == "sft"
    assert set(recipe.LOCKED_PACKAGES) <= set(data["versions"])
    assert data["versions"]["torch"]
    again = recipe.load("sft", lock)
    assert again.sha256 == loaded.sha256 and again.recipe.trainer["learning_rate"] == 5e-4
    # A lock made with another transformers version is refused unless drift is allowed.
    data["versions"]["transformers"] = "0.0.1"
    lock.write_text(yaml.safe_dump(data))
    with pytest.raises(recipe.RecipeError, match=r"drifted.*transformers locked 0\.0\.1"):
        recipe.load("sft", lock)
    drifted = recipe.load("sft", lock, allow_drift=True)
    assert drifted.drift["transformers"][0] == "0.0.1" and drifted.sha256 == loaded.sha256
    with pytest.raises(recipe.RecipeError, match="lock is for stage 'sft'"):
        recipe.load("rm", lock, allow_drift=True)


def test_help_lists_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for stage in ("data", "sft"):
        assert stage in out


def test_bare_yaml_no_becomes_the_enum_value(sft_yaml):
    # YAML 1.1 reads `no` as false; TrainingArguments wants the string "no".
    loaded = recipe.load("sft", sft_yaml(), ["trainer.save_strategy=no", "trainer.eval_strategy=no"])
    assert loaded.recipe.trainer["save_strategy"] == "no" and loaded.recipe.trainer["eval_strategy"] == "no"
    recipe.trainer_config("sft", loaded.recipe)   # TRL accepts it
