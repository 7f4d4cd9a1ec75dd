"""The official openai client against `lockstep serve` (tests/tests/serve.rs).

Environment: LOCKSTEP_BASE_URL (http://host:port/v1), LOCKSTEP_KEY (a good
key), LOCKSTEP_SLOW_KEY (a key limited to 2 requests a minute),
LOCKSTEP_RECEIPTS (a file to append every receipt to, one per line),
LOCKSTEP_WORKER_METRICS (a worker's /metrics URL). At the end the server's
and the worker's /metrics are parsed with prometheus_client's text-format
parser and checked against the work done here.
Prints one JSON object of findings on stdout; any failed check raises.
"""

import json
import os
import sys

import urllib.request

import openai
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

base = os.environ["LOCKSTEP_BASE_URL"]
client = OpenAI(base_url=base, api_key=os.environ["LOCKSTEP_KEY"], max_retries=0, timeout=300)
found = {}
receipts = open(os.environ["LOCKSTEP_RECEIPTS"], "a")
# The work done, to check the metrics against: choices, completion tokens,
# successful requests per endpoint.
work = {"choices": 0, "completion_tokens": 0, "prompt_tokens": 0, "ok": {}}


def count(endpoint, resp):
    work["ok"][endpoint] = work["ok"].get(endpoint, 0) + 1
    work["choices"] += len(resp.choices)
    work["completion_tokens"] += resp.usage.completion_tokens
    work["prompt_tokens"] += resp.usage.prompt_tokens


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
count("/v1/completions", c)
found["completion_lockstep"] = keep(c)

# The raw response carries the receipt digest in a header too.
raw = client.completions.with_raw_response.create(model="smollm2", prompt="Hello", max_tokens=2, temperature=0)
assert raw.headers["x-lockstep-receipt"].startswith("sha3-256:"), raw.headers
keep(raw.parse())
count("/v1/completions", raw.parse())

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
count("/v1/chat/completions", ch)

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
work["ok"]["/v1/chat/completions"] += 1
work["choices"] += 1
work["completion_tokens"] += last.usage.completion_tokens
work["prompt_tokens"] += last.usage.prompt_tokens

# n = 2 with a seed: two samples; the same request again gives the same text.
def sampled():
    r = client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=42, n=2
    )
    keep(r)
    count("/v1/completions", r)
    return [x.text for x in r.choices]


first, again = sampled(), sampled()
assert len(first) == 2 and first == again, (first, again)
found["sampled"] = first

# Token ids as the prompt, on a model without a tokenizer.
t = client.completions.create(model="stories260K", prompt=[1, 403, 407], max_tokens=6, temperature=0)
assert t.model_extra["lockstep"]["choices"][0]["output_ids"], t
keep(t)
count("/v1/completions", t)


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


def metrics(url):
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = sample.value
    return out


def value(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0)


m = metrics(base.rsplit("/v1", 1)[0] + "/metrics")
for endpoint, n in work["ok"].items():
    got = value(m, "lockstep_serve_requests_total", endpoint=endpoint, status="200")
    assert got == n, (endpoint, got, n)
assert value(m, "lockstep_serve_requests_total", endpoint="/v1/completions", status="404") >= 1
assert value(m, "lockstep_serve_requests_total", endpoint="/v1/models", status="429") >= 1
assert value(m, "lockstep_serve_requests_total", endpoint="/v1/models", status="401") >= 1
assert value(m, "lockstep_serve_completions_total", verdict="verified") == work["choices"], (m, work)
assert value(m, "lockstep_serve_tokens_total", kind="completion") == work["completion_tokens"], work
assert value(m, "lockstep_serve_request_seconds_count", endpoint="/v1/completions") == work["ok"]["/v1/completions"]
assert value(m, "lockstep_serve_inflight_requests") == 0
assert value(m, "lockstep_workers", backend="cpu", state="up") == 2, m
assert value(m, "lockstep_serve_resident_memory_bytes") > 0
w = metrics(os.environ["LOCKSTEP_WORKER_METRICS"])
# r = 2 with two workers: each computed every choice.
assert value(w, "lockstep_worker_jobs_total", op="generate", outcome="ok") == work["choices"], w
assert value(w, "lockstep_worker_tokens_total") == work["completion_tokens"], w
assert value(w, "lockstep_worker_models_loaded") >= 1
assert any(k[0] == "lockstep_worker_backend_info" and dict(k[1]).get("backend") == "cpu" for k in w)
found["work"] = work
json.dump(found, sys.stdout)
