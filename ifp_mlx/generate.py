"""One-shot generation with the chat template applied, on top of mlx-lm's generate loop."""

from typing import List, Union

import mlx.nn as nn
from mlx_lm import generate as _mlx_generate

from .errors import IFPError


def prompt_tokens(tokenizer, prompt: Union[str, List[int], List[dict]], chat: bool = True) -> List[int]:
    """Token ids for ``prompt``: a user message (chat template applied), messages, or ids."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise IFPError("empty prompt")
        messages = [{"role": "user", "content": prompt}]
    elif prompt and isinstance(prompt[0], dict):
        messages = prompt
    elif isinstance(prompt, list) and prompt:
        return list(prompt)
    else:
        raise IFPError("empty prompt")
    if chat and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return tokenizer.encode("\n".join(m["content"] for m in messages))


def generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, List[int], List[dict]],
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Answer ``prompt`` in one shot (greedy unless a ``sampler`` is given)."""
    tokens = prompt_tokens(tokenizer, prompt)
    return _mlx_generate(model, tokenizer, tokens, max_tokens=max_tokens, verbose=verbose, **kwargs)
