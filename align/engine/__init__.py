"""Fast rollouts for DeepSeek-V2-style models: absorbed MLA over a paged latent cache, DeepSeekMoE, continuous
batching and per-request seeded sampling, behind a vLLM-like API.

    from align.engine import Engine, SamplingParams
    engine = Engine.from_model(hf_model)
    out = engine.generate([[1, 2, 3]], SamplingParams(n=4, temperature=1.0, max_tokens=64))
    out[0].outputs[0].token_ids, out[0].outputs[0].logprobs
"""

from .cache import kv_bytes_per_token
from .engine import Engine
from .params import CompletionOutput, RequestOutput, SamplingParams
from .scheduler import EngineStats

__all__ = ["CompletionOutput", "Engine", "EngineStats", "RequestOutput", "SamplingParams", "kv_bytes_per_token"]
