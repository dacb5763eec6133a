"""`herd serve --compile`: compiled decode steps answer the same greedy text as `generate`.

The quick test runs the server's compile path with the compiled step run eagerly (the graph itself
is tested in tests/test_batching.py); the slow one starts `herd serve --compile` and lets
torch.compile build the graphs (minutes on 2 shared cores)."""

import os
import subprocess
import sys
import time

import pytest

from herd.inference import batching, compiled

from .test_serve import free_port, greedy_reference, loaded, openai, serve  # noqa: F401

PROMPTS = ["def f(x):", "import os\n", "x ="]


def test_serve_compile_path_quick(loaded, monkeypatch):  # noqa: F811
    calls = []

    def eager_step(model, cache, tokens, positions, documents):
        calls.append(tokens.shape[0])
        return compiled._step(model, cache, tokens, positions, documents)

    monkeypatch.setattr(batching, "compiled_step", eager_step)
    model, tok = loaded
    with serve(loaded, compile=True) as s:
        client = s.client()
        for prompt in PROMPTS:
            reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0.0)
            assert reply.choices[0].text == greedy_reference(loaded, tok.encode(prompt, bos=True), 8)
    assert calls  # the decode steps went through the compiled path


@pytest.mark.slow
def test_herd_serve_compile_answers_greedy_text(loaded, tiny_checkpoint):  # noqa: F811
    _, tok = loaded
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(tiny_checkpoint), "--port", str(port),
                             "--max-batch", "2", "--compile"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                name = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "herd serve --compile did not come up"
                time.sleep(0.2)
        for prompt in PROMPTS:
            reply = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0.0)
            assert reply.choices[0].text == greedy_reference(loaded, tok.encode(prompt, bos=True), 8)
    finally:
        proc.terminate()
        proc.wait(60)
