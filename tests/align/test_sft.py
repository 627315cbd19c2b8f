"""The SFT stage end to end on a micro model: folder contents, metrics, SIGKILL + resume, LoRA, 2-process DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from align.checkpoint import load_trained

from .conftest import ROOT, micro_sft, run_align, write_recipe

FULL_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "recipe.lock.yaml", "metrics.json", "log_history.json"}


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_file()}


@pytest.mark.slow
def test_sft_writes_model_lock_metrics_and_checkpoints(tmp_path):
    out = tmp_path / "sft"
    recipe = write_recipe(tmp_path / "sft.yaml", micro_sft(out, steps=8))
    run_align("sft", "--config", recipe, "trainer.learning_rate=1e-3")
    assert FULL_MODEL_FILES <= _files(out)
    assert not (_files(out) - FULL_MODEL_FILES - {"training_args.bin", "README.md"})
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("heldout_math_accuracy", "heldout_math_pass1", "heldout_loss", "train_loss"):
        assert isinstance(metrics[key], float), key
    assert metrics["global_step"] == 8 and metrics["world_size"] == 1
    lock = yaml.safe_load((out / "recipe.lock.yaml").read_text())
    assert lock["recipe"]["trainer"]["learning_rate"] == 1e-3 and lock["sha256"] == metrics["recipe_sha256"]
    # A finished run is never overwritten.
    res = run_align("sft", "--config", recipe, check=False)
    assert res.returncode == 2 and "holds a finished run" in res.stderr
    # Re-running from the lock reproduces the recipe (same hash) into a fresh folder.
    res = run_align("sft", "--config", out / "recipe.lock.yaml", f"output_dir={tmp_path / 'again'}")
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["recipe_sha256"] != metrics["recipe_sha256"]  # output_dir differs, so the hash must too
    a, b = load_trained(out), load_trained(tmp_path / "again")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_reaches_same_final_step(tmp_path):
    out = tmp_path / "sft"
    raw = micro_sft(out, steps=40)
    raw["trainer"].update(save_steps=5, save_total_limit=None)
    recipe = write_recipe(tmp_path / "sft.yaml", raw)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "align", "sft", "--config", str(recipe)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-10" / "trainer_state.json").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert killed_at < 40
    res = run_align("sft", "--config", recipe, check=False)
    assert res.returncode == 2 and "--resume" in res.stderr      # not silently restarted
    res = run_align("sft", "--config", recipe, "--resume")
    assert f"checkpoint-{killed_at}" in res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 40
    state = json.loads((out / "checkpoint-40" / "trainer_state.json").read_text())
    assert state["global_step"] == 40


@pytest.mark.slow
def test_lora_saves_only_adapter_which_loads_onto_base(tmp_path):
    base_out = tmp_path / "base"
    run_align("sft", "--config", write_recipe(tmp_path / "base.yaml", micro_sft(base_out, steps=4)))
    out = tmp_path / "lora"
    raw = micro_sft(out, steps=6)
    raw["model"] = {"path": str(base_out), "dtype": "float32"}
    raw["peft"] = {"r": 4, "lora_alpha": 8}
    raw["trainer"]["learning_rate"] = 1e-2
    run_align("sft", "--config", write_recipe(tmp_path / "lora.yaml", raw))
    files = _files(out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_out)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_out), out)
    merged = load_trained(out)
    ids = torch.tensor([[1, 5, 9, 30, 40, 7]])
    with torch.no_grad():
        lb, la, lm = base(ids).logits, with_adapter(ids).logits, merged(ids).logits
    assert not torch.allclose(lb, la, atol=1e-5)          # the adapter changes the model
    torch.testing.assert_close(la, lm, atol=1e-4, rtol=1e-4)  # and merging keeps its outputs


@pytest.mark.slow
def test_two_process_ddp_on_cpu_is_one_synchronized_job(tmp_path):
    out = tmp_path / "ddp"
    recipe = write_recipe(tmp_path / "sft.yaml", micro_sft(out, steps=6))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "recipes/accelerate/ddp.yaml"), "-m", "align", "sft", "--config", str(recipe)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    sums = metrics["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]      # both ranks hold identical weights
    # Each rank drew its own batches: twice the samples of one process went through the steps.
    assert metrics["train_samples_per_second"] > 0
    model = load_trained(out)
    assert abs(sum(float(p.double().sum()) for p in model.parameters()) - sums[0]) < 1e-3


def test_bad_data_row_names_file_and_row(tmp_path, root):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1?", "answer": "2", "solution": "\\\\boxed{2}"}\n{"prompt": "x", "answr": "3"}\n')
    raw = micro_sft(tmp_path / "out", steps=1)
    raw["data"]["train"] = [{"path": str(bad), "kind": "math"}]
    res = run_align("sft", "--config", write_recipe(tmp_path / "sft.yaml", raw), check=False)
    assert res.returncode == 2
    assert f"{bad}: row 2: missing field 'answer'" in res.stderr
    assert not (tmp_path / "out").exists()      # failed before any work or output


def test_resume_passes_over_a_checkpoint_cut_off_mid_write(tmp_path, caplog):
    from align.stage import last_checkpoint

    for step, complete in ((2, True), (10, True), (11, False)):   # numeric order, not name order
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-final").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert "checkpoint-11 has no trainer_state.json" in caplog.text
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    assert last_checkpoint(tmp_path) is None
