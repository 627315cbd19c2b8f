"""Text-in, text-out sampling for evaluation: chat-template the prompts, generate, decode.

The MLA/MoE engine does the work (it caches only the latent KV); ``backend="hf"`` uses transformers'
``generate`` instead, for comparisons and for models the engine does not read.
"""

from __future__ import annotations

import torch

from align.chat import prompt_messages


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt rendered as a single user turn plus the assistant prefix."""
    return [
        tokenizer.apply_chat_template(prompt_messages(p), tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        for p in prompts
    ]


def make_engine(model):
    """An engine for evaluating ``model``: on the GPU when there is one (bf16 for fp32 weights), else on CPU."""
    from align.engine import Engine

    device = "cuda" if torch.cuda.is_available() else None
    dtype = torch.bfloat16 if device == "cuda" and model.dtype == torch.float32 else None
    return Engine.from_model(model, device=device, dtype=dtype)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int, temperature: float, max_new_tokens: int, seed: int,
           backend: str = "engine", batch_size: int = 64, engine=None, progress: bool = True) -> list[list[str]]:
    """``n`` completions per prompt, as decoded strings (special tokens dropped)."""
    ids = encode_prompts(tokenizer, prompts)
    if backend == "engine":
        from align.engine import SamplingParams
        from align.engine.sampler import derive_seed

        engine = engine or make_engine(model)
        # One seed per prompt: a shared seed would hand every prompt the same random numbers, so sample i of
        # each prompt would fail or succeed together and pass@k would be far noisier than its sample count says.
        params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens, seed=derive_seed(seed, i),
                                 stop_token_ids=[tokenizer.eos_token_id]) for i in range(len(ids))]
        results = engine.generate(ids, params, use_tqdm=progress)
        return [[tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in r.outputs] for r in results]
    if backend != "hf":
        raise ValueError(f"unknown generation backend {backend!r} (engine|hf)")
    return _sample_hf(model, tokenizer, ids, n, temperature, max_new_tokens, seed, batch_size)


def _sample_hf(model, tokenizer, ids, n, temperature, max_new_tokens, seed, batch_size):
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[list[str]] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        # Left padding so every row's next token sits in the last column.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
        gen = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=1.0, top_k=0,
            num_return_sequences=n, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )  # (len(chunk) * n, width + new)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        out.extend(texts[i * n:(i + 1) * n] for i in range(len(chunk)))
    model.train(was_training)
    return out
