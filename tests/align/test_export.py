"""``align export``: the exported folder loads in plain transformers and in the engine with identical outputs,
LoRA runs export merged, sharding, dtype conversion, and an existing folder is never clobbered."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from align.checkpoint import load_trained
from align.cli import main as align_main
from align.export import ExportError, export, lineage, model_card

from .conftest import micro_sft, run_align, write_recipe

PROMPTS = ["What is 3 + 4?", "Write a function add(a, b).", "Hello!"]
IDS = torch.tensor([[0, 5, 9, 30, 40, 7, 300, 12]])


@pytest.fixture(scope="module")
def sft(micro_sft_dir):
    return micro_sft_dir


@pytest.fixture(scope="module")
def exported(sft, tmp_path_factory):
    return export(sft, tmp_path_factory.mktemp("export") / "model", dtype="fp32")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits  # (1, T, V)


@pytest.mark.slow
def test_round_trip_same_logits_and_engine_matches_transformers_greedy(sft, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.engine import Engine, SamplingParams
    from align.generation import encode_prompts

    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf).__name__ == "DeepseekV2ForCausalLM"
    assert torch.equal(_logits(load_trained(sft)), _logits(hf))

    tok = AutoTokenizer.from_pretrained(exported)
    prompts = encode_prompts(tok, PROMPTS)
    engine = Engine.from_pretrained(exported, device="cpu", use_tqdm=False)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, n=1))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
        assert out.outputs[0].token_ids == ref.tolist()


@pytest.mark.slow
def test_folder_holds_config_generation_config_tokenizer_and_card(sft, exported):
    from transformers import AutoTokenizer

    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= files
    # Stage bookkeeping stays behind; the card carries it.
    assert not files & {"training_args.bin", "recipe.lock.yaml", "metrics.json", "adapter_config.json"}
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and config["architectures"] == ["DeepseekV2ForCausalLM"]
    assert config["use_cache"] is True
    tok = AutoTokenizer.from_pretrained(exported)
    gen = json.loads((exported / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.chat_template and tok.chat_template == AutoTokenizer.from_pretrained(sft).chat_template
    card = (exported / "README.md").read_text()
    lock = yaml.safe_load((sft / "recipe.lock.yaml").read_text())
    assert lock["sha256"] in card and (sft / "recipe.lock.yaml").read_text().strip() in card
    metrics = json.loads((sft / "metrics.json").read_text())
    assert f"{metrics['heldout_math_accuracy']:.4f}" in card and "heldout_math_pass1" in card
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.slow
def test_small_shard_size_writes_index_and_shards_that_load(sft, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export(sft, tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s)
                                   for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert torch.equal(_logits(load_trained(sft)), _logits(AutoModelForCausalLM.from_pretrained(out)))


@pytest.mark.slow
def test_lora_run_exports_merged_model_matching_base_plus_adapter(sft, tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp("lora")
    raw = micro_sft(base / "lora", steps=4, model={"path": str(sft), "dtype": "float32"},
                    peft={"r": 4, "lora_alpha": 8})
    raw["eval"].update(limit=2, max_new_tokens=4)  # the stage's own metrics are not what this test checks
    lora = base / "lora"
    run_align("sft", "--config", write_recipe(base / "lora.yaml", raw))
    assert (lora / "adapter_config.json").exists()
    out = export(lora, tmp_path_factory.mktemp("lora-export") / "model")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and not {"adapter_config.json", "adapter_model.safetensors"} & files
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), lora).eval()
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(with_adapter),
                               atol=1e-4, rtol=1e-4)
    card = (out / "README.md").read_text()
    for stage in (lora, sft):  # the whole lineage: the adapter's lock, then its base's
        assert yaml.safe_load((stage / "recipe.lock.yaml").read_text())["sha256"] in card


@pytest.mark.slow
def test_existing_out_is_refused_then_replaced_with_force_and_bf16(sft, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert align_main(["export", "--checkpoint", str(sft), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} already exists" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]

    assert align_main(["export", "--checkpoint", str(sft), "--out", str(out), "--force", "--dtype", "bf16"]) == 0
    assert not (out / "keep.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["model"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_bad_paths_fail_with_clear_errors(tmp_path, capsys):
    assert align_main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert f"checkpoint folder not found: {tmp_path / 'missing'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no model"):
        export(tmp_path / "empty", tmp_path / "o")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="would replace the checkpoint"):
        export(model, model, force=True)
    with pytest.raises(ExportError, match="would replace the checkpoint"):
        export(model, tmp_path, force=True)
    with pytest.raises(ExportError, match="unknown dtype"):
        export(model, tmp_path / "o", dtype="int8")
    assert not (tmp_path / "o").exists()


def _stage(folder: Path, stage: str, model: dict, sha: str, metrics: dict | None = None,
           evals: dict | None = None) -> Path:
    folder.mkdir()
    lock = {"stage": stage, "sha256": sha, "git_commit": "abc", "recipe": {"output_dir": str(folder), "model": model}}
    (folder / "recipe.lock.yaml").write_text(yaml.safe_dump(lock, sort_keys=False))
    if metrics:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if evals:
        (folder / "eval").mkdir()
        (folder / "eval" / "eval.json").write_text(json.dumps(evals))
    return folder


def test_lineage_walks_every_lock_and_card_tabulates_metrics_and_evals(tmp_path):
    sft = _stage(tmp_path / "sft", "sft", {"preset": "tiny", "path": None}, "a" * 64,
                 {"heldout_math_accuracy": 0.25, "heldout_math_pass1": 0.125})
    grpo = _stage(tmp_path / "grpo", "grpo", {"path": str(sft)}, "b" * 64,
                  {"heldout_math_accuracy": 0.5, "heldout_math_pass1": 0.375},
                  {"tasks": {"math": {"pass_at_k": {"pass@1": 0.625, "pass@8": 0.875}}}})
    again = _stage(tmp_path / "grpo2", "grpo", {"path": "deepseek-ai/DeepSeek-V2-Lite-Chat"}, "c" * 64)
    stages = lineage(grpo)
    assert [s.path for s in stages] == [grpo.resolve(), sft.resolve()]
    card = model_card(stages, grpo, "fp32")
    assert "a" * 64 in card and "b" * 64 in card
    assert "| grpo | `grpo` | 0.5000 | 0.3750 | 0.6250 | 0.8750 |" in card
    assert "| sft | `sft` | 0.2500 | 0.1250 | – | – |" in card
    # A hub starting point ends the walk and says so.
    (only,) = lineage(again)
    assert "deepseek-ai/DeepSeek-V2-Lite-Chat" in only.note and "deepseek-ai" in model_card([only], again, "bf16")
