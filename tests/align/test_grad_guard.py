"""GradGuard inside a real Trainer loop: a NaN written into one expert's gradient during backward."""

import json

import pytest
import torch
from transformers import DeepseekV2ForCausalLM, Trainer, TrainerCallback, TrainingArguments

from align.grad_guard import GradGuard, GradGuardSection
from align.model import build_config
from tests.align.conftest import MICRO_MODEL

EXPERTS = "model.layers.1.mlp.experts.gate_up_proj"


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 1024, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Snapshots(TrainerCallback):
    """The expert stack after every optimizer step (step number -> tensor)."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after[state.global_step] = dict(model.named_parameters())[EXPERTS].detach().clone()


def train(tmp_path, poison_steps, guard_cfg, steps=4):
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(build_config("tiny", **MICRO_MODEL))
    calls = {"n": 0}

    def poison(grad):                      # the backward of step k (one micro-batch per step) writes a NaN
        calls["n"] += 1
        if calls["n"] in poison_steps:
            grad = grad.clone()
            grad[1, 0, 0] = float("nan")
        return grad

    dict(model.named_parameters())[EXPERTS].register_hook(poison)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    seen = []
    guard = GradGuard(guard_cfg, tmp_path, on_step=seen.append)
    snaps = Snapshots()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[guard, snaps])
    return trainer, guard, snaps, seen


def test_a_nonfinite_step_is_skipped_reported_and_training_goes_on(tmp_path):
    trainer, guard, snaps, seen = train(tmp_path, poison_steps={2}, guard_cfg=GradGuardSection())
    trainer.train()
    assert seen == [False, True, False, False]
    assert guard.skipped == 1
    assert torch.equal(snaps.after[2], snaps.after[1])          # step 2 did not touch the weights
    assert not torch.equal(snaps.after[3], snaps.after[2])      # step 3 trained
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    (line,) = (tmp_path / "nonfinite_grads.jsonl").read_text().splitlines()
    report = json.loads(line)
    assert report["step"] == 2
    rows = {r["param"]: r for r in report["params"]}
    assert rows == {EXPERTS: {"param": EXPERTS, "nonfinite": 1, "experts": [1]}}   # found where it started


def test_without_the_guard_one_nan_poisons_every_weight(tmp_path):
    trainer, guard, snaps, seen = train(tmp_path, poison_steps={2}, guard_cfg=GradGuardSection(skip_nonfinite=False))
    trainer.train()
    assert seen == [] and not (tmp_path / "nonfinite_grads.jsonl").exists()
    assert torch.isnan(snaps.after[2]).any()


def test_too_many_skips_in_a_row_stop_the_run(tmp_path):
    trainer, guard, snaps, seen = train(tmp_path, poison_steps={2, 3}, guard_cfg=GradGuardSection(max_consecutive=2),
                                        steps=6)
    with pytest.raises(RuntimeError, match="2 optimizer steps in a row had non-finite gradients"):
        trainer.train()
    assert len((tmp_path / "nonfinite_grads.jsonl").read_text().splitlines()) == 2


def test_bad_section_is_refused():
    with pytest.raises(ValueError, match="max_consecutive"):
        GradGuardSection(max_consecutive=0)


def test_the_sft_stage_skips_and_logs_a_nonfinite_step(tmp_path, monkeypatch):
    from align import recipe
    from align.sft import SFTRun

    from .conftest import ROOT, micro_sft, write_recipe

    monkeypatch.chdir(ROOT)
    out = tmp_path / "sft"
    run = SFTRun(recipe.load("sft", write_recipe(tmp_path / "sft.yaml", micro_sft(out, steps=4))))
    run.setup()
    calls = {"n": 0}

    def poison(grad):                      # one micro-batch per step: the second step's backward writes a NaN
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    dict(run.trainer.model.named_parameters())[EXPERTS].register_hook(poison)
    run.train()
    (line,) = (out / "nonfinite_grads.jsonl").read_text().splitlines()
    assert json.loads(line)["step"] == 2
    logged = [h["grad/skipped"] for h in run.trainer.state.log_history if "grad/skipped" in h]
    assert logged == [0.5, 0.0]            # logging_steps 2: steps 1-2 (one skipped), steps 3-4
    assert all(torch.isfinite(p).all() for p in run.trainer.model.parameters())
