"""The official `openai` Python client against a real llava-server (started here on the tiny fixture).

Usage: python tests/openai_client.py path/to/llava-server
Checks non-streaming, streaming with include_usage, an image by data URI, an image by URL from a local
HTTP server (allowed with --allow-private-media-hosts), that errors surface as the client's
exception types, the Responses API, structured outputs (`parse()` with a nested pydantic model,
`json_object`, and LangChain's `with_structured_output` when langchain-openai is installed),
`models.retrieve` and `/tokenize` with an image. Expected texts come from HF's references in tests/fixtures/refs/tiny.json.
"""

import base64
import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request

import openai
import pydantic
from typing import Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MODEL = "tiny-llava"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(name):
    with open(os.path.join(FIXTURES, "refs", "tiny.json")) as f:
        return next(c for c in json.load(f)["cases"] if c["name"] == name)


def image_message(url):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is in the picture?"},
    ]}]


def main(binary):
    port = free_port()
    server = subprocess.Popen(
        [binary, "serve", "--model", os.path.join(FIXTURES, "tiny"), "--served-model-name", MODEL,
         "--port", str(port), "--allow-private-media-hosts", "--num-kv-blocks", "400"],
        env={**os.environ, "RUST_LOG": "warn"},
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.path.join(FIXTURES, "images"))
    handler.log_message = lambda *a: None
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    image_base = f"http://127.0.0.1:{images.server_address[1]}"
    passed, failed = 0, 0
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                    break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not become healthy")
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        want = reference("chat_template")["greedy"]["text"]
        with open(os.path.join(FIXTURES, "images", "scene_640x480.png"), "rb") as f:
            data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()

        def check_non_streaming():
            r = client.chat.completions.create(model=MODEL, messages=image_message(data_uri),
                                               temperature=0, max_tokens=16)
            assert r.choices[0].message.content == want, r
            assert r.choices[0].finish_reason == "length"
            assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == 594, r.usage

        def check_streaming():
            stream = client.chat.completions.create(model=MODEL, messages=image_message(data_uri), temperature=0,
                                                    max_tokens=16, stream=True,
                                                    stream_options={"include_usage": True})
            text, usage, finishes = "", None, []
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    text += c.delta.content or ""
                    if c.finish_reason:
                        finishes.append(c.finish_reason)
            assert text == want, text
            assert finishes == ["length"], finishes
            assert usage is not None and usage.completion_tokens == 16, usage

        def check_image_url():
            r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16,
                                               messages=image_message(f"{image_base}/scene_640x480.png"))
            assert r.choices[0].message.content == want, r

        def check_errors():
            try:
                client.chat.completions.create(model="no-such-model", messages=image_message(data_uri))
                raise AssertionError("unknown model accepted")
            except openai.NotFoundError as e:
                assert e.status_code == 404
            try:
                client.chat.completions.create(model=MODEL, messages=image_message(data_uri), temperature=5)
                raise AssertionError("temperature 5 accepted")
            except openai.BadRequestError as e:
                assert e.status_code == 400 and "temperature" in str(e), e

        responses_input = [{"role": "user", "content": [
            {"type": "input_image", "image_url": data_uri},
            {"type": "input_text", "text": "What is in the picture?"},
        ]}]

        def check_responses_create():
            # The same prompt as the chat case, so HF's greedy text; 16 tokens end it early, which the
            # Responses API reports as `incomplete` (max_output_tokens).
            r = client.responses.create(model=MODEL, input=responses_input, temperature=0, max_output_tokens=16)
            assert r.output_text == want, r
            assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", r
            assert r.usage.input_tokens == 594 and r.usage.output_tokens == 16, r.usage
            r = client.responses.create(model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=4)
            assert r.usage.output_tokens <= 4 and r.output[0].role == "assistant", r
            try:
                client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1")
                raise AssertionError("previous_response_id accepted")
            except openai.BadRequestError as e:
                assert "previous_response_id" in str(e), e

        def check_responses_stream():
            with client.responses.stream(model=MODEL, input=responses_input, temperature=0,
                                         max_output_tokens=16) as stream:
                kinds, text, last = [], "", None
                for event in stream:
                    kinds.append(event.type)
                    if event.type == "response.output_text.delta":
                        text += event.delta
                    last = event
            assert text == want, text
            assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                                 "response.content_part.added"], kinds
            assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                                  "response.output_item.done", "response.incomplete"], kinds
            assert last.response.output[0].content[0].text == want, last
            assert last.response.usage.output_tokens == 16, last.response.usage

        class Pet(pydantic.BaseModel):
            kind: Literal["cat", "dog"]
            legs: int = pydantic.Field(ge=0, le=4)

        class Person(pydantic.BaseModel):
            name: str = pydantic.Field(max_length=6)
            age: int = pydantic.Field(ge=0, le=120)
            pet: Pet
            tags: list[bool] = pydantic.Field(max_length=3)

        def check_parse():
            # Random weights, yet valid instances: the grammar allows nothing else.
            for kwargs in ({"temperature": 0}, {"temperature": 1.2, "seed": 5, "n": 2}):
                r = client.chat.completions.parse(model=MODEL, messages=image_message(data_uri),
                                                  response_format=Person, max_tokens=120, **kwargs)
                for choice in r.choices:
                    assert choice.finish_reason == "stop", choice
                    assert isinstance(choice.message.parsed, Person), choice
                    assert isinstance(choice.message.parsed.pet, Pet), choice
            try:
                client.chat.completions.create(model=MODEL, messages=image_message(data_uri), response_format={
                    "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
                raise AssertionError("an uncompilable schema accepted")
            except openai.BadRequestError as e:
                assert e.status_code == 400 and "response_format" in str(e), e

        def check_json_object():
            finished = 0
            for seed in range(8):
                r = client.chat.completions.create(model=MODEL, messages=image_message(data_uri), seed=seed,
                                                   response_format={"type": "json_object"}, max_tokens=60)
                content = r.choices[0].message.content
                assert content.startswith("{"), content
                if r.choices[0].finish_reason == "stop":
                    finished += 1
                    assert isinstance(json.loads(content), dict), content
            assert finished > 0, "no json_object answer finished within 60 tokens"

        def check_prompt_logprobs():
            # lm-eval-harness' log-likelihood request: the prompt scored, nothing generated.
            with open(os.path.join(FIXTURES, "refs", "prompt_logprobs.json")) as f:
                case = json.load(f)["cases"][0]
            r = client.completions.create(model=MODEL, prompt=case["prompt"], echo=True, logprobs=1,
                                          max_tokens=0, temperature=0)
            lp = r.choices[0].logprobs
            assert r.choices[0].text == case["prompt"] and lp.token_logprobs[0] is None, r
            for got, want in zip(lp.token_logprobs[1:], case["tokens"], strict=True):
                assert abs(got - want["logprob"]) < 1e-4, (got, want)

        def check_models_and_tokenize():
            assert client.models.retrieve(MODEL).id == MODEL
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/tokenize", method="POST", headers={"Content-Type": "application/json"},
                data=json.dumps({"model": MODEL, "messages": image_message(data_uri)}).encode())
            with urllib.request.urlopen(request) as r:
                body = json.load(r)
            assert body["tokens"] == reference("chat_template")["input_ids"], body["count"]
            assert body["count"] == 594

        def check_langchain_structured_output():
            try:
                from langchain_openai import ChatOpenAI
            except ImportError:
                print("skipped check_langchain_structured_output: langchain-openai is not installed")
                return
            llm = ChatOpenAI(model=MODEL, base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                             temperature=0, max_tokens=120, max_retries=0)
            person = llm.with_structured_output(Person).invoke("Describe a person and their pet.")
            assert isinstance(person, Person) and isinstance(person.pet, Pet), person

        for check in (check_non_streaming, check_streaming, check_image_url, check_errors,
                      check_responses_create, check_responses_stream, check_parse, check_json_object,
                      check_prompt_logprobs, check_models_and_tokenize, check_langchain_structured_output):
            try:
                check()
                passed += 1
                print(f"ok {check.__name__}")
            except Exception:
                failed += 1
                print(f"FAILED {check.__name__}")
                traceback.print_exc()
    finally:
        server.terminate()
        server.wait(timeout=30)
        images.shutdown()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
