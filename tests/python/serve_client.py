"""The official openai client against `lockstep serve` (tests/tests/serve.rs).

Environment: LOCKSTEP_BASE_URL (http://host:port/v1), LOCKSTEP_KEY (a good
key), LOCKSTEP_SLOW_KEY (a key limited to 2 requests a minute),
LOCKSTEP_RECEIPTS (a file to append every receipt to, one per line).
Prints one JSON object of findings on stdout; any failed check raises.
"""

import json
import os
import sys

import openai
from openai import OpenAI

base = os.environ["LOCKSTEP_BASE_URL"]
client = OpenAI(base_url=base, api_key=os.environ["LOCKSTEP_KEY"], max_retries=0, timeout=300)
found = {}
receipts = open(os.environ["LOCKSTEP_RECEIPTS"], "a")


def keep(resp):
    """Every response carries its receipts and verdicts in `lockstep`."""
    extra = resp.model_extra["lockstep"]
    assert extra["verified"] is True, extra
    assert extra["receipt_digest"].startswith("sha3-256:"), extra
    for r in extra["receipts"]:
        receipts.write(json.dumps(r) + "\n")
    receipts.flush()
    return extra


# The models the server was started with.
models = [m.id for m in client.models.list().data]
assert "smollm2" in models, models
found["models"] = models

# A completion.
c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
assert c.object == "text_completion" and len(c.choices) == 1, c
assert c.usage.completion_tokens >= 1 and c.usage.prompt_tokens >= 5, c.usage
assert c.choices[0].finish_reason in ("stop", "length")
found["completion"] = c.choices[0].text
found["completion_lockstep"] = keep(c)

# The raw response carries the receipt digest in a header too.
raw = client.completions.with_raw_response.create(model="smollm2", prompt="Hello", max_tokens=2, temperature=0)
assert raw.headers["x-lockstep-receipt"].startswith("sha3-256:"), raw.headers
keep(raw.parse())

# A chat completion.
ch = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "Name a colour."}],
    max_tokens=8,
    temperature=0,
)
assert ch.object == "chat.completion" and ch.choices[0].message.role == "assistant", ch
found["chat"] = ch.choices[0].message.content
keep(ch)

# Streaming: the chunks put together are the non-streamed text.
pieces, finish, last = [], None, None
for chunk in client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "Name a colour."}],
    max_tokens=8,
    temperature=0,
    stream=True,
):
    last = chunk
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert "".join(pieces) == found["chat"], (pieces, found["chat"])
assert finish is not None
keep(last)
found["stream_chunks"] = len(pieces)

# n = 2 with a seed: two samples; the same request again gives the same text.
def sampled():
    r = client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=42, n=2
    )
    keep(r)
    return [x.text for x in r.choices]


first, again = sampled(), sampled()
assert len(first) == 2 and first == again, (first, again)
found["sampled"] = first

# Token ids as the prompt, on a model without a tokenizer.
t = client.completions.create(model="stories260K", prompt=[1, 403, 407], max_tokens=6, temperature=0)
assert t.model_extra["lockstep"]["choices"][0]["output_ids"], t
keep(t)


def status_of(call):
    try:
        call()
    except openai.APIStatusError as e:
        return e.status_code, e.body
    raise AssertionError("the request should have failed")


bad = OpenAI(base_url=base, api_key="lsk-wrong", max_retries=0)
found["bad_key"] = status_of(lambda: bad.models.list())
found["unknown_model"] = status_of(
    lambda: client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
)
found["long_prompt"] = status_of(
    lambda: client.completions.create(model="smollm2", prompt="word " * 10000, max_tokens=2)
)
found["bad_param"] = status_of(
    lambda: client.completions.create(model="smollm2", prompt="x", max_tokens=2, logprobs=2)
)
slow = OpenAI(base_url=base, api_key=os.environ["LOCKSTEP_SLOW_KEY"], max_retries=0)
codes = []
for _ in range(3):
    try:
        slow.models.list()
        codes.append(200)
    except openai.APIStatusError as e:
        codes.append(e.status_code)
found["slow_key"] = codes
json.dump(found, sys.stdout)
