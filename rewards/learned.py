"""Learned reward models as reward functions: a sequence classifier scores prompt + completion.

``align rm`` trains them (``DeepseekV2ForSequenceClassification`` with one output, initialised from an SFT
checkpoint); :func:`load_reward_fn` turns the folder it wrote into a function with TRL's reward signature, so a
GRPO recipe can list ``{name: "learned:outputs/tiny/rm", weight: 0.5}`` next to the verifiers.

The text scored is exactly what the reward model was trained on: the conversation rendered with the tokenizer's
chat template (``<bos>User: {prompt}\\n\\nAssistant: {completion}<eos>``), and the score is read at its last token.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rewards import as_text

log = logging.getLogger(__name__)

__all__ = ["load_reward_fn", "load_reward_model", "sequence_classifier", "to_conversation", "RewardModel"]

_MODELS: dict[tuple[str, str, str], RewardModel] = {}
_MODELS_LOCK = threading.Lock()


def to_conversation(prompt: Any, completion: Any) -> list[dict]:
    """One scored conversation from TRL's plain or conversational prompt/completion forms.

    >>> to_conversation("2 + 2?", "4")
    [{'role': 'user', 'content': '2 + 2?'}, {'role': 'assistant', 'content': '4'}]
    >>> to_conversation([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}])
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise TypeError(f"prompt must be a string or a list of {{role, content}} messages, got {prompt!r:.200}")
    if isinstance(completion, (list, tuple)) and completion and all(
            isinstance(m, dict) and "role" in m for m in completion):
        return messages + [dict(m) for m in completion]
    return messages + [{"role": "assistant", "content": as_text(completion)}]


def sequence_classifier(path: str | Path, dtype: torch.dtype = torch.float32):
    """A one-output ``DeepseekV2ForSequenceClassification`` whose trunk is the causal LM saved in ``path``.

    The score head is new (randomly initialised); the LM head is dropped.  A LoRA-adapter folder is first merged
    into the base model its lock names.
    """
    from transformers import AutoModelForSequenceClassification

    from align.checkpoint import is_adapter, load_trained

    path = Path(path)
    if is_adapter(path):
        causal = load_trained(path, dtype)
        config = causal.config
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        state = {k: v for k, v in causal.state_dict().items() if not k.startswith("lm_head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("score.")]:
            raise ValueError(f"{path}: merged weights do not fit a sequence classifier "
                             f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    else:
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        # The missing score head and the unused lm_head are expected here; TRL's context silences just those.
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
    return model


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The trained reward model in ``path`` (a full model, or a LoRA adapter over the SFT folder its lock names)."""
    from transformers import AutoModelForSequenceClassification

    from align.checkpoint import is_adapter, stage_lock

    path = Path(path)
    if not (path / "config.json").exists() and not is_adapter(path):
        hint = " (the run has not finished: no metrics.json)" if path.is_dir() and not (
            path / "metrics.json").exists() else ""
        raise FileNotFoundError(f"{path}: no reward model here (expected config.json or adapter_config.json){hint}")
    if is_adapter(path):
        from peft import PeftModel

        lock = stage_lock(path)
        base_path = ((lock or {}).get("recipe") or {}).get("model", {}).get("path")
        if base_path is None:
            raise FileNotFoundError(f"{path} holds a LoRA adapter but no recipe.lock.yaml naming its base model")
        model = PeftModel.from_pretrained(sequence_classifier(base_path, dtype), str(path)).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    if getattr(model.config, "num_labels", None) != 1:
        raise ValueError(f"{path}: not a reward model (a sequence classifier with num_labels=1); "
                         f"found {type(model).__name__} with num_labels={model.config.num_labels}")
    return model


class RewardModel:
    """A loaded reward model and its tokenizer; ``score`` is thread-safe and batched."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        from align.model import load_tokenizer

        self.path = Path(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_reward_model(self.path, dtype).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            # The classifier reads the score at the last non-pad token; it needs to know which id pads.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = self.model.config.pad_token_id
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()
        self._warned_truncation = False

    def encode(self, conversations: Sequence[list[dict]]) -> list[list[int]]:
        ids = [self.tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
               for c in conversations]
        if self.max_length:
            too_long = sum(len(x) > self.max_length for x in ids)
            if too_long and not self._warned_truncation:
                log.warning("%s: %d conversation(s) exceed %d tokens; keeping their last %d tokens",
                            self.path, too_long, self.max_length, self.max_length)
                self._warned_truncation = True
            # The score is read at the final token, so the end of the conversation is what must survive.
            ids = [x[-self.max_length:] for x in ids]
        return ids

    @torch.no_grad()
    def score_ids(self, ids: Sequence[list[int]], batch_size: int = 32) -> list[float]:
        """One score per token sequence; sequences of similar length are batched together."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        with self._lock:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(ids[i]) for i in chunk)
                # Right padding: the classifier picks the rightmost non-pad token, i.e. each row's own last token.
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # (B, T)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)                    # (B, T)
                for row, i in enumerate(chunk):
                    input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                    mask[row, :len(ids[i])] = 1
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                    use_cache=False).logits  # (B, 1)
                for row, i in enumerate(chunk):
                    out[i] = float(logits[row, 0])
        return out

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], batch_size: int = 32) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.score_ids(self.encode([to_conversation(p, c) for p, c in zip(prompts, completions)]),
                              batch_size)


def _cached_model(path: str | Path, device, dtype: torch.dtype) -> RewardModel:
    resolved = os.path.realpath(path)
    dev = str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    key = (resolved, dev, str(dtype))
    with _MODELS_LOCK:
        if key not in _MODELS:
            log.info("loading reward model %s on %s", path, dev)
            _MODELS[key] = RewardModel(path, dev, dtype)
        return _MODELS[key]


def clear_cache() -> None:
    """Forget loaded reward models (e.g. after a reward model folder was replaced)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def load_reward_fn(path: str | Path, device: str | None = None, batch_size: int = 32,
                   **unknown: Any) -> Callable[..., list[float]]:
    """A reward function over the reward model in ``path``: ``fn(completions, prompts=None, **kw) -> list[float]``.

    ``prompts`` are TRL's prompts (strings or message lists), ``completions`` TRL's completions (strings or
    ``[{"role": "assistant", "content": ...}]``); other columns are ignored.  The model is loaded once per
    (path, device) and shared by every function made for it.  Scores are the classifier's raw outputs (the
    Bradley-Terry logit), so only differences between them mean anything.
    """
    if unknown:
        raise ValueError(f"learned reward {path!s}: no option(s) {sorted(unknown)}; accepted: ['batch_size', 'device']")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"learned reward {path!s}: batch_size must be a positive integer, got {batch_size!r}")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"learned reward: no reward model folder at {path}")
    rm = _cached_model(path, device, torch.float32)

    def reward(completions: Sequence[Any], prompts: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
        if prompts is None:
            raise ValueError(f"{reward.__name__}: a learned reward scores prompt + completion; pass `prompts`")
        return rm.score(prompts, completions, batch_size)

    reward.__name__ = reward.__qualname__ = f"learned_{os.path.basename(os.path.normpath(str(path))) or 'model'}"
    reward.model = rm  # type: ignore[attr-defined]
    return reward
