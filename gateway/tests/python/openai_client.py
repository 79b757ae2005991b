"""Drives the gateway's /v1/chat/completions with the official openai package.

Usage: openai_client.py BASE_URL TOKEN EXPECTED_TEXT MODEL
Exits non-zero (with the reason) when anything differs from the contract.
"""
import sys

from openai import OpenAI

base_url, token, expected, model = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
client = OpenAI(base_url=base_url, api_key=token, max_retries=0)

completion = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "glass?"}]
)
text = completion.choices[0].message.content
assert text == expected, f"non-stream text {text!r} != {expected!r}"
assert completion.usage.completion_tokens > 0, completion.usage

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "glass again?"}],
    stream=True,
    stream_options={"include_usage": True},
)
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert "".join(parts) == expected, f"stream text {''.join(parts)!r}"
assert finish == "stop", finish
assert usage is not None and usage.prompt_tokens > 0, usage
print("openai client OK")
