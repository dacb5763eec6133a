"""`herd serve` driven by the official `openai` client against a real uvicorn server on 127.0.0.1,
serving a tiny random-weight multimodal checkpoint with its own tokenizer."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from herd.inference import generate  # noqa: E402
from herd.inference.session import load_model_and_tokenizer  # noqa: E402
from herd.serve.app import ServeConfig, create_app  # noqa: E402
from herd.serve.text import IncrementalText, token_string  # noqa: E402

TIMEOUT = 60  # seconds, for any one request


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_model_and_tokenizer(tiny_checkpoint)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server in a background thread, stopped (and drained) on exit."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), timeout=TIMEOUT,
                             max_retries=0, **kw)


def serve(loaded, **config):
    model, tok = loaded
    return Server(create_app(model, tok, ServeConfig(model_name="tiny", **config)))


@pytest.fixture(scope="module")
def server(loaded):
    with serve(loaded, max_image_pixels=100_000) as s:
        yield s


def png(width=40, height=24) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def greedy_reference(loaded, ids, max_tokens, pixel_values=None):
    model, tok = loaded
    out = generate(model, torch.tensor([ids]), max_tokens, temperature=0.0, stop_token_ids=list(tok.stop_ids),
                   pixel_values=pixel_values)
    new = out[0, len(ids):].tolist()
    return tok.decode(new, skip_special=True)


class Reply:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.text = status, body.decode()

    def json(self):
        return json.loads(self.text)


def http(url: str, body=None, *, json_body=None, headers=None) -> Reply:
    """A raw request (for what the openai client would refuse to send); any status is returned."""
    if json_body is not None:
        body = json.dumps(json_body)
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
            return Reply(r.status, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read())


def metric(server, name) -> float:
    text = http(server.url + "/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


# ------------------------------------------------------------------------------------------------

def test_chat_matches_greedy_generate_stream_and_not(server, loaded):
    model, tok = loaded
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def fib(n):"}]
    from herd.chat import render_chat

    ids = render_chat(messages, tok, add_generation_prompt=True).ids
    expected = greedy_reference(loaded, ids, 12)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_text_echo_and_logprobs(server, loaded):
    model, tok = loaded
    client = server.client()
    prompt = "import os\nimport"
    ids = tok.encode(prompt, bos=True)
    expected = greedy_reference(loaded, ids, 8)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected

    # lm-eval's local-completions scoring call: token ids in, echo, one logprob per token.
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    # each prompt token's top logprobs hold it and the most likely token there: lm-eval's greedy flag
    for i in range(1, len(ids)):
        best = int(ref[i - 1].argmax())
        assert set(lp.top_logprobs[i]) == {token_string(tok, ids[i]), token_string(tok, best)}
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1, best]), abs=1e-4)
    generated = int(ref[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1, generated]), abs=1e-4)
    assert max(lp.top_logprobs[-1].values()) == pytest.approx(lp.token_logprobs[-1], abs=1e-6)
    assert r.choices[0].text.startswith(tok.decode(ids, skip_special=True))

    # max_tokens 0 with echo scores the prompt alone; several prompts in one call.
    r = client.completions.create(model="tiny", prompt=[ids, ids[:4]], max_tokens=0, echo=True, logprobs=0)
    assert [len(c.logprobs.tokens) for c in r.choices] == [len(ids), 4]
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids) + 4

    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_image_prompt(server, loaded):
    model, tok = loaded
    client = server.client()
    content = [{"type": "image_url", "image_url": {"url": png()}}, {"type": "text", "text": "What is this?"}]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                       max_tokens=6, temperature=0)
    from herd.chat import render_chat
    from herd.data.images import ImageProcessor

    raw = base64.b64decode(png().split(",", 1)[1])
    rendered = render_chat([{"role": "user", "content": [{"type": "image", "image": raw},
                                                         {"type": "text", "text": "What is this?"}]}],
                           tok, add_generation_prompt=True, image_processor=ImageProcessor.from_config(
                               model.config.vision))
    assert r.usage.prompt_tokens == len(rendered.ids) and tok.patch_id in rendered.ids  # the tiles' layout
    assert r.choices[0].message.content == greedy_reference(loaded, rendered.ids, 6, rendered.pixel_values)


def test_n_seed_and_stop_strings(server):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me a story."}]
    kw = dict(model="tiny", messages=messages, max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(n=2, seed=7, **kw)
    b = client.chat.completions.create(n=2, seed=7, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # seed + index per choice
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(n=2, seed=7, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in a.choices]

    full = client.completions.create(model="tiny", prompt="class Foo:", max_tokens=24, temperature=0).choices[0]
    text = full.text
    assert len(text) > 6, "the model must say something to cut"
    stop = text[3:6]
    cut = client.completions.create(model="tiny", prompt="class Foo:", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="class Foo:", max_tokens=24,
                                                                   temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == cut.choices[0].text
    long = client.completions.create(model="tiny", prompt="class Foo:", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 40 and long.choices[0].finish_reason == "length"


def test_chat_logprobs(server):
    r = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace")


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server):
    client = server.client()
    url = server.url + "/v1/chat/completions"
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad = [
        (b"{not json", 400),
        (json.dumps({**good, "temperature": "hot"}), 400),
        (json.dumps({**good, "temperature": -1}), 400),
        (json.dumps({**good, "model": "gpt-9"}), 404),
        (json.dumps({**good, "messages": "hi"}), 400),
        (json.dumps({**good, "n": 1000}), 400),
        (json.dumps({**good, "max_tokens": 10**6}), 400),
        (json.dumps({**good, "messages": [{"role": "wizard", "content": "x"}]}), 400),
        (json.dumps({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}), 400),
        (json.dumps({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64"}}]}]}), 400),
        (json.dumps({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                + base64.b64encode(b"\x89PNG nope").decode()}}]}]}), 400),
        (json.dumps({**good, "messages": [{"role": "user", "content": [  # over max_image_pixels
            {"type": "image_url", "image_url": {"url": png(1000, 1000)}}]}]}), 400),
    ]
    for body, status in bad:
        r = http(url, body)
        assert r.status_code == status, (body[:80], r.text)
        error = r.json()["error"]
        assert error["message"] and "Traceback" not in r.text
    # An oversized body is refused from its headers, before it is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (33 * 2**20))
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:  # chunked: unbounded
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 411")
    assert http(server.url + "/v1/nothing-here").json()["error"]["message"]
    r = http(server.url + "/v1/completions", json_body={"model": "tiny", "prompt": [5] * 3000})
    assert r.status_code == 400 and "at most" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=good["messages"], temperature=-0.5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=good["messages"])
    r = client.chat.completions.create(model="tiny", messages=good["messages"], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tokenize_detokenize_models_health_metrics(server, loaded):
    _, tok = loaded
    r = http(server.url + "/tokenize", json_body={"prompt": "hello world"}).json()
    assert r["tokens"] == tok.encode("hello world", bos=True) and r["count"] == len(r["tokens"])
    r = http(server.url + "/detokenize", json_body={"tokens": tok.encode("hello world")}).json()
    assert r["prompt"] == "hello world"
    assert http(server.url + "/detokenize", json_body={"tokens": [10**9]}).status_code == 400
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    assert http(server.url + "/health").json() == {"status": "ok"}
    before = metric(server, "herd_generation_tokens_total")
    server.client().completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    assert metric(server, "herd_generation_tokens_total") >= before + 1
    text = http(server.url + "/metrics").text
    for name in ("herd_requests_running", "herd_requests_waiting", "herd_prompt_tokens_total",
                 'herd_time_to_first_token_seconds_bucket{le="+Inf"}', "herd_inter_token_latency_seconds_count"):
        assert name in text


def test_api_key(loaded):
    with serve(loaded, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert http(s.url + "/v1/models").status_code == 401
        assert [m.id for m in s.client(api_key="s3cret").models.list()] == ["tiny"]
        assert http(s.url + "/health").status_code == 200


def test_full_queue_gets_429_and_a_dropped_stream_frees_its_row(loaded):
    with serve(loaded, max_batch=1, max_waiting=0) as s:
        client = s.client()
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=2000, temperature=0,
                                           stream=True)
        next(iter(stream))  # running now
        assert metric(s, "herd_requests_running") == 1
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="b", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        stream.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 30
        while metric(s, "herd_requests_running") or s.app.state.worker.in_flight():
            assert time.monotonic() < deadline, "the dropped stream's row was not freed"
            time.sleep(0.05)
        assert client.completions.create(model="tiny", prompt="b", max_tokens=2).choices[0].text is not None

        # A client that hangs up on a reply that is not streamed frees its row too.
        body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 2000, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait = time.monotonic() + 30
            while not metric(s, "herd_requests_running"):
                assert time.monotonic() < wait, "the request did not start"
                time.sleep(0.02)
            tokens_then = metric(s, "herd_generation_tokens_total")
        deadline = time.monotonic() + 30
        while metric(s, "herd_requests_running") or s.app.state.worker.in_flight():
            assert time.monotonic() < deadline, "the hung-up request's row was not freed"
            time.sleep(0.05)
        assert metric(s, "herd_generation_tokens_total") - tokens_then < 1900  # stopped long before 2000


def test_incremental_text_holds_partial_characters_and_stop_strings(loaded):
    _, tok = loaded
    ids = tok.encode("héllo ✓ world, STOP here")
    assert tok.decode(ids[:2]).endswith("\ufffd") or any(tok.decode(ids[:k]).endswith("\ufffd")
                                                         for k in range(1, len(ids)))
    text = IncrementalText(tok, stop=["STOP"])
    pieces = [text.add([i]) for i in ids]
    assert "".join(pieces) == "héllo ✓ world, " and text.stopped
    assert all("\ufffd" not in p and "ST" not in p for p in pieces)
    text = IncrementalText(tok, stop=["world!"])  # a prefix that never completes is released at the end
    pieces = [text.add([i]) for i in tok.encode("hello world")]
    assert "".join(pieces) == "hello " and text.flush() == "world"


def test_serve_command_prints_the_url_and_drains_on_sigterm(tiny_checkpoint, tmp_path):
    import os
    import shutil
    import signal
    import subprocess
    import sys

    port = free_port()
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "served")
    (checkpoint / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_p": 0.5}))
    env = {**os.environ, "HERD_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(checkpoint), "--port", str(port),
                             "--max-batch", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed before the server starts listening
        assert f"http://127.0.0.1:{port}" in line, line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", timeout=TIMEOUT, max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "herd serve did not come up"
                time.sleep(0.1)
        name = models.data[0].id
        assert name == checkpoint.name
        # generation_config.json's temperature 0 is the default: two unseeded replies agree.
        replies = [client.completions.create(model=name, prompt="x =", max_tokens=6).choices[0].text for _ in range(2)]
        assert replies[0] == replies[1]
        long = dict(model=name, prompt="y =", max_tokens=200, extra_body={"ignore_eos": True})
        whole = client.completions.create(**long)
        stream = client.completions.create(stream=True, **long)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)  # the running stream still completes
        rest = list(stream)
        assert first.choices[0].text + "".join(c.choices[0].text for c in rest) == whole.choices[0].text
        assert rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_an_engine_failure_is_a_500_without_traceback_and_the_engine_is_rebuilt(loaded):
    with serve(loaded) as s:
        worker = s.app.state.worker
        broken = worker.engine

        def fail():
            raise RuntimeError("secret internal detail")

        broken.step = fail
        r = http(s.url + "/v1/completions", json_body={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and "secret" not in r.text and "Traceback" not in r.text
        assert r.json()["error"]["type"] == "server_error"
        assert worker.engine is not broken
        assert s.client().completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


class ScriptedEngine:
    """The engine interface, answering every request with the same tokens, one per step."""

    script: list[int] = []

    def __init__(self, model, **kw):
        self.requests, self.num_waiting = {}, 0

    @property
    def num_running(self):
        return len(self.requests)

    def add(self, request):
        self.requests[request.id] = 0

    def abort(self, request_id):
        self.requests.pop(request_id, None)

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        from herd.inference.batching import StepOutput

        outputs = []
        for rid, k in list(self.requests.items()):
            done = k + 1 == len(self.script)
            outputs.append(StepOutput(rid, [self.script[k]], None, None, done, "stop" if done else None, 3))
            self.requests[rid] = k + 1
            if done:
                del self.requests[rid]
        return outputs


def test_tool_calls_in_the_chat_format(loaded, monkeypatch):
    from herd.chat import render_chat
    from herd.serve import app as app_module

    _, tok = loaded
    ScriptedEngine.script = (tok.encode("Let me run it.") + [tok.python_start_id] + tok.encode("print(6 * 7)")
                             + [tok.python_end_id, tok.eom_id])
    monkeypatch.setattr(app_module, "Engine", ScriptedEngine)
    with serve(loaded) as s:
        client = s.client()
        messages = [{"role": "user", "content": "What is 6 * 7?"}]
        r = client.chat.completions.create(model="tiny", messages=messages)
        choice = r.choices[0]
        assert choice.message.content == "Let me run it." and choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.function.name == "python" and json.loads(call.function.arguments) == {"code": "print(6 * 7)"}

        chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me run it."  # no code as text
        calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
        assert json.loads(calls[0].function.arguments)["code"] == "print(6 * 7)"
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # The call and its result go back in the conversation as Llama 4 renders them.
        follow = messages + [{"role": "assistant", "content": "Let me run it.",
                              "tool_calls": [call.model_dump(exclude_none=True)]},
                             {"role": "tool", "tool_call_id": call.id, "content": "42"}]
        ids = http(s.url + "/tokenize", json_body={"messages": follow}).json()["tokens"]
        assert ids == render_chat(messages + [{"role": "assistant", "content": "Let me run it.",
                                               "tool_call": "print(6 * 7)"}, {"role": "ipython", "content": "42"}],
                                  tok, add_generation_prompt=True).ids


def test_histogram_text_is_cumulative():
    from herd.serve.metrics import Histogram

    h = Histogram("lat", "help", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = h.render()
    assert lines[2:] == ['lat_bucket{le="0.1"} 2', 'lat_bucket{le="1.0"} 3', 'lat_bucket{le="+Inf"} 4',
                         "lat_sum 3.65", "lat_count 4"]
