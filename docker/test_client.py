#!/usr/bin/env python3
"""HTTP client of docker/test.sh (standard library only): requests whose expected text is HF's greedy
output for the tiny fixture (tests/fixtures/refs/tiny.json, case `text_only`), a stream during
`docker stop`, and a streaming load that counts every failed or inexact answer.

  test_client.py chat BASE_URL
  test_client.py drain BASE_URL CONTAINER
  test_client.py load BASE_URL STOP_FILE WORKERS
"""
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny-llava"


def reference():
    with open(os.path.join(ROOT, "tests/fixtures/refs/tiny.json")) as f:
        case = next(c for c in json.load(f)["cases"] if c["name"] == "text_only")
    # The reference's prompt is the chat template applied to this one user message (tests/api.rs).
    assert case["prompt"] == "USER: Write a haiku about llamas. ASSISTANT:", case["prompt"]
    return case["greedy"]["text"], case["greedy"]["max_new_tokens"]


def body(max_tokens, stream):
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
        "messages": [{"role": "user", "content": "Write a haiku about llamas."}],
    }


def post(base, payload, timeout=120):
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps({k: v for k, v in payload.items() if v is not None}),
                 {"content-type": "application/json"})
    return conn, conn.getresponse()


def stream(base, max_tokens, on_chunk=None):
    """One streamed chat: (status, text, finish_reason, completion_tokens, saw_done)."""
    conn, r = post(base, body(max_tokens, True))
    if r.status != 200:
        return r.status, r.read().decode(errors="replace"), None, None, False
    text, finish, usage, done = [], None, None, False
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            return 200, json.dumps(chunk), None, None, False
        for c in chunk.get("choices", []):
            text.append(c["delta"].get("content") or "")
            finish = c.get("finish_reason") or finish
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        if on_chunk:
            on_chunk()
    conn.close()
    return 200, "".join(text), finish, usage, done


def chat(base):
    want, n = reference()
    conn, r = post(base, body(n, False))
    got = json.loads(r.read())
    assert r.status == 200, got
    text = got["choices"][0]["message"]["content"]
    assert text == want, f"got {text!r}, want HF's {want!r}"
    status, streamed, finish, usage, done = stream(base, n)
    assert (status, streamed, finish, usage, done) == (200, want, "length", n, True), (status, streamed, finish)
    print(f"chat: whole and streamed answers equal HF's greedy text ({n} tokens): {want!r}")


def drain(base, container):
    want, _ = reference()
    n = int(os.environ.get("DRAIN_TOKENS", "1500"))
    chunks, after_stop = [0], [0]
    stopped = threading.Event()
    result = {}

    def on_chunk():
        chunks[0] += 1
        if stopped.is_set():
            after_stop[0] += 1

    t = threading.Thread(target=lambda: result.update(r=stream(base, n, on_chunk)))
    t.start()
    while chunks[0] < 20:
        time.sleep(0.01)
    t0 = time.time()
    stopper = subprocess.Popen(["docker", "stop", "-t", "60", container], stdout=subprocess.DEVNULL)
    time.sleep(0.3)  # SIGTERM delivered; the stream keeps going
    stopped.set()
    # A new request now must not be served (the listener is closed or the server answers 503).
    try:
        conn, r = post(base, body(4, False), timeout=5)
        refused = f"HTTP {r.status}"
        assert r.status == 503, refused
    except (ConnectionError, OSError) as e:
        refused = type(e).__name__
    t.join()
    stopper.wait()
    exit_code = subprocess.check_output(["docker", "inspect", "-f", "{{.State.ExitCode}}", container]).decode().strip()
    status, text, finish, usage, done = result["r"]
    print(f"drain: stream of {n} tokens: {chunks[0]} chunks, {after_stop[0]} of them after SIGTERM; "
          f"finish={finish} completion_tokens={usage} [DONE]={done}; new request during drain: {refused}; "
          f"docker stop took {time.time() - t0:.1f} s; exit code {exit_code}")
    assert status == 200 and done and finish == "length" and usage == n, result["r"][:1]
    assert text.startswith(want), "the drained stream's first tokens differ from HF's greedy text"
    assert after_stop[0] > 0, "the stream ended before SIGTERM: raise DRAIN_TOKENS"
    assert exit_code == "0", exit_code


def load(base, stop_file, workers):
    """Streams until STOP_FILE exists; every answer must be complete and HF-exact."""
    want, n = reference()
    long_n = 200
    counts = {"ok": 0, "failed": 0}
    failures = []
    lock = threading.Lock()

    def worker(i):
        k = 0
        while not os.path.exists(stop_file):
            tokens = long_n if (i + k) % 4 == 0 else n
            k += 1
            try:
                status, text, finish, usage, done = stream(base, tokens)
                good = status == 200 and done and finish == "length" and usage == tokens and (
                    text == want if tokens == n else text.startswith(want))
                why = None if good else f"status={status} finish={finish} usage={usage} done={done} {text[:120]!r}"
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                good, why = False, repr(e)
            with lock:
                counts["ok" if good else "failed"] += 1
                if why:
                    failures.append(why)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"load: {counts['ok']} streams exact and complete, {counts['failed']} failed ({workers} clients)")
    for f in failures[:10]:
        print("  failure:", f)
    sys.exit(1 if counts["failed"] else 0)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"chat": lambda: chat(*args), "drain": lambda: drain(*args),
     "load": lambda: load(args[0], args[1], int(args[2]))}[cmd]()
