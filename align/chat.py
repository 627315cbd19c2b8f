"""The DeepSeek-V2 chat format, as a Jinja chat template for Hugging Face tokenizers.

DeepSeek-V2-Chat renders a conversation as
``<bos>[system\n\n]User: {u}\n\nAssistant: {a}<eos>User: ...``.  The assistant reply is wrapped in
``{% generation %}`` so that ``apply_chat_template(..., return_assistant_tokens_mask=True)`` (and TRL's
``assistant_only_loss``) can train on assistant tokens only.  The generation prompt is ``Assistant: `` with the
trailing space, exactly the prefix the rendered assistant turn starts with, so prompt + completion tokenizes the
same way at training and at sampling time.
"""

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜pad｜>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def prompt_messages(prompt: str) -> list[dict]:
    """The single-turn conversation a task prompt becomes."""
    return [{"role": "user", "content": prompt}]
