"""What JSON Schema cannot say about a valid request, stated for schemathesis' positive cases.

The OpenAPI document is exact for everything a schema can express (api/request_schemas.rs). What
it cannot express, a valid request must still meet, and these hooks make each generated body meet
it before it is sent: a real image behind each image URL, a prompt and `max_tokens` within the
context, token ids below the vocabulary size, `best_of` equal to `n`, and a response format's JSON
Schema, regular expression and grammar ones that compile (the document can only give their types).
Budgets are kept small (a few tokens, short texts) so a run spends its time on validation, not on
generating text with the tiny model.
"""

import base64
import json
import pathlib
import sys

import schemathesis

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
IMAGE = "data:image/png;base64," + base64.b64encode(
    (FIXTURES / "images" / "gray_300x200.png").read_bytes()
).decode()
VOCAB = 32064  # the tiny fixture's vocabulary rows (config.json text_config.vocab_size)
MAX_IMAGES = 1  # 576 tokens; with the text below it fits run.sh's 1,024-token context
MAX_TEXT_CHARS = 80  # at most 4 tokens a character (byte fallback): ≤ 320 tokens
MAX_NEW_TOKENS = 8


def _budget(body):
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        if _valid_int(value, 1, 2**32 - 1):
            body[field] = min(value, MAX_NEW_TOKENS)
        elif isinstance(value, float) and value.is_integer() and 1 <= value < 2**32:
            # Kept a float: the coverage phase sends integral floats as "incorrect types"
            # (see filter_failure), and the case must stay what it was generated as.
            body[field] = float(min(value, MAX_NEW_TOKENS))
    if "input" in body:
        if body.get("max_output_tokens") is None:
            body["max_output_tokens"] = MAX_NEW_TOKENS
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_NEW_TOKENS


def _short(text, left):
    return text[: max(left, 0)]


def _valid_image(part):
    image = part.get("image_url")
    return (
        isinstance(image, dict)
        and isinstance(image.get("url"), str)
        and image.get("detail") in (None, "auto", "low", "high")
    )


def _chat(body):
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    text_left, images_left = MAX_TEXT_CHARS, MAX_IMAGES
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict):
            continue
        if isinstance(content, str):
            message["content"] = _short(content, text_left)
            text_left -= len(message["content"])
        elif isinstance(content, list):
            for i, part in enumerate(content):
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "image_url" and _valid_image(part):
                    if images_left > 0:
                        part["image_url"]["url"] = IMAGE
                        images_left -= 1
                    else:
                        content[i] = {"type": "text", "text": ""}
                elif part.get("type") == "text" and isinstance(part.get("text"), str):
                    part["text"] = _short(part["text"], text_left)
                    text_left -= len(part["text"])


def _responses_input(body):
    """The Responses API's `input` and `instructions`: short texts, a real image."""
    if isinstance(body.get("instructions"), str):
        body["instructions"] = _short(body["instructions"], MAX_TEXT_CHARS // 4)
    items = body.get("input")
    if isinstance(items, str):
        body["input"] = _short(items, MAX_TEXT_CHARS)
    if not isinstance(items, list):
        return
    text_left, images_left = MAX_TEXT_CHARS, MAX_IMAGES
    for item in items:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            item["content"] = _short(content, text_left)
            text_left -= len(item["content"])
        elif isinstance(content, list):
            for i, part in enumerate(content):
                if not isinstance(part, dict):
                    continue
                kind = part.get("type")
                if kind == "input_image" and isinstance(part.get("image_url"), str) and part.get(
                    "detail"
                ) in (None, "auto", "low", "high"):
                    if images_left > 0:
                        part["image_url"] = IMAGE
                        images_left -= 1
                    else:
                        content[i] = {"type": "input_text", "text": ""}
                elif kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
                    part["text"] = _short(part["text"], text_left)
                    text_left -= len(part["text"])


# Any object is a schema to the document; the server compiles it into a grammar and refuses one
# that does not compile. A small schema that does stands in for the generated one.
COMPILABLE_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def _response_formats(body):
    formats = [body.get("response_format")]
    if isinstance(body.get("text"), dict):
        formats.append(body["text"].get("format"))
    for fmt in formats:
        if not isinstance(fmt, dict):
            continue
        holder = fmt.get("json_schema") if "json_schema" in fmt else fmt
        if isinstance(holder, dict) and isinstance(holder.get("schema"), dict):
            holder["schema"] = dict(COMPILABLE_SCHEMA)
    # vLLM's `structured_outputs`: a schema, expression and grammar that compile, same types.
    outputs = body.get("structured_outputs")
    if isinstance(outputs, dict):
        for key, value in (("json", COMPILABLE_SCHEMA), ("regex", "[a-z]{1,4}"), ("grammar", 'start: "yes" | "no"')):
            if isinstance(outputs.get(key), dict) and key == "json":
                outputs[key] = dict(value)
            elif isinstance(outputs.get(key), str):
                outputs[key] = json.dumps(value) if key == "json" else value


def _valid_int(value, low, high):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@schemathesis.hook
def map_body(ctx, body):
    """Applied to every generated body, positive or negative: each change keeps a valid body valid
    and touches only parts that are valid themselves, so a body that breaks the schema still does
    (schemathesis also re-checks every mapped case against the schema)."""
    if not isinstance(body, dict):
        return body
    _budget(body)
    bias = body.get("logit_bias")
    if isinstance(bias, dict):
        for key in [k for k in bias if k.isdigit() and k == str(int(k)) and int(k) >= VOCAB]:
            del bias[key]
    if _valid_int(body.get("best_of"), 1, 16) and (body.get("n") is None or _valid_int(body.get("n"), 1, 16)):
        body["best_of"] = body.get("n") or 1
    if "messages" in body:
        _chat(body)
    if isinstance(body.get("tokens"), list):
        body["tokens"] = _token_ids(body["tokens"])
    _responses_input(body)
    _response_formats(body)
    body["prompt"] = _completion_prompt(body.get("prompt"))
    if body["prompt"] is None:
        del body["prompt"]
    return body


def _token_ids(ids):
    """Valid token ids kept valid, below the vocabulary size, and few."""
    return [t % VOCAB if _valid_int(t, 0, 2**32 - 1) else t for t in ids[:MAX_TEXT_CHARS]]


def _completion_prompt(prompt):
    """A prompt, token ids, or a list of either: short texts, ids below the vocabulary size."""
    if isinstance(prompt, str):
        return _short(prompt, MAX_TEXT_CHARS)
    if not isinstance(prompt, list):
        return prompt
    if all(isinstance(p, list) for p in prompt):
        return [_token_ids(p) for p in prompt]
    if all(isinstance(p, str) for p in prompt):
        return [_short(p, MAX_TEXT_CHARS // max(len(prompt), 1)) for p in prompt]
    return _token_ids(prompt)


INTEGER_FIELDS = {"n", "seed", "max_tokens", "max_completion_tokens", "max_output_tokens", "top_k", "top_logprobs", "best_of", "logprobs"}


# Refusals of rules JSON Schema cannot state, each named in the document's descriptions. A schema-
# valid request refused for one of these is not a mismatch between document and server. The
# coverage phase sends some cases (the minimal ones) without passing them through `map_body`.
SEMANTIC_REFUSALS = (
    "`best_of` is only supported equal to `n`",
    "exceed the context of",
    "which fills the context of",
    "is not a token id below",
    "is not below the vocabulary size",
    # An image behind each URL: the hooks put one there, but not every case passes through them.
    "invalid image URL",
    "image URL",
    "invalid data URI",
    # A JSON Schema that does not compile (the hooks replace generated ones, not every case).
    "cannot be compiled into a grammar",
    "is not a JSON Schema object",
)


@schemathesis.hook
def filter_failure(ctx, failure, case, response):
    """Keeps every failure except two kinds of false report.

    - A schema-valid request refused for a rule JSON Schema cannot state (SEMANTIC_REFUSALS).
    - The coverage phase sends an integral float (`118.0`) as an "incorrect type" for an integer
      field, yet JSON Schema says 118.0 is an integer (so does jsonschema_rs, schemathesis' own
      validator), and the server reads it as one: dropped only when the field it names holds an
      integral float.
    """
    kind = type(failure).__name__
    if kind == "RejectedPositiveData" and response is not None and response.status_code == 400:
        message = str(response.json().get("error", {}).get("message", ""))
        if any(rule in message for rule in SEMANTIC_REFUSALS):
            print(f"filtered (a rule JSON Schema cannot state): {message}", file=sys.stderr)
            return False
        return True
    if kind != "AcceptedNegativeData" or "Incorrect type" not in failure.message:
        return True
    body = case.body if isinstance(case.body, dict) else {}
    for field in INTEGER_FIELDS:
        value = body.get(field)
        if f"in body - {field}:" in failure.message and isinstance(value, float) and value.is_integer():
            print(f"filtered (an integral float is an integer): {field} = {value}", file=sys.stderr)
            return False
    return True
