"""Lists the gateway's models and is refused a foreign model and an oversized
max_tokens, with the official openai package.

Usage: models_client.py BASE_URL TOKEN EXPECTED_IDS MAX_TOKENS_CAP
EXPECTED_IDS is comma-separated, in the gateway's order.
Exits non-zero (with the reason) when anything differs from the contract.
"""
import sys

import openai
from openai import OpenAI

base_url, token, expected, cap = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = OpenAI(base_url=base_url, api_key=token, max_retries=0)

models = client.models.list()
ids = [m.id for m in models]
assert ids == expected.split(","), f"models {ids!r} != {expected!r}"
for m in models:
    assert m.object == "model", m
    assert isinstance(m.created, int) and m.owned_by, m
assert client.models.retrieve(ids[-1]).id == ids[-1]
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("retrieving an unknown model succeeded")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e.body

messages = [{"role": "user", "content": "glass?"}]
try:
    client.chat.completions.create(model="gpt-not-allowed", messages=messages)
    raise AssertionError("an unknown model was accepted")
except openai.BadRequestError as e:
    assert e.code == "model_not_found", e.body
    assert "gpt-not-allowed" in e.message, e.message

try:
    client.chat.completions.create(model=ids[0], messages=messages, max_tokens=cap + 1)
    raise AssertionError("max_tokens over the cap was accepted")
except openai.BadRequestError as e:
    assert e.code == "max_tokens_too_large", e.body
    assert str(cap) in e.message, e.message

try:
    client.chat.completions.create(
        model=ids[0], messages=messages, max_completion_tokens=cap + 1
    )
    raise AssertionError("max_completion_tokens over the cap was accepted")
except openai.BadRequestError as e:
    assert e.code == "max_tokens_too_large", e.body

# A listed model at the cap goes through.
completion = client.chat.completions.create(model=ids[-1], messages=messages, max_tokens=cap)
assert completion.choices[0].message.content, completion
print("openai models OK")
