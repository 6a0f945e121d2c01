"""`lorart serve` under bad input and overload: OpenAI-style 4xx bodies, API key, body bound, 429 on a full queue,
client disconnects, failing adapters and forwards, SIGTERM drain, CLI errors, /metrics and /health, and the text
stream (stop strings, UTF-8 split across tokens)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, os.path.dirname(__file__))
from serve_helpers import make_engine, metric_value, Paused, reference_text, Server, wait_until  # noqa: E402
from serve_helpers import one_thread, tiny  # noqa: E402,F401 - fixtures: one intra-op thread (autouse);
#   the tiny model and its two adapters (once per module)

import lorart  # noqa: E402
from lorart.serving.text import TextStream  # noqa: E402

PYDIR = os.path.dirname(os.path.dirname(lorart.__file__))


@pytest.fixture(scope="module")
def server(tiny):
    model_dir, ads = tiny
    eng, _ = make_engine(model_dir, ads)
    with Server(eng) as srv:
        yield srv


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b"", 400, None, "JSON object"),
    (b'{"model": "alpha"}', 400, "prompt", "Field required"),
    (b'{"model": "nope", "prompt": "x"}', 404, "model", "does not exist"),
    (b'{"prompt": "x", "max_tokens": 100000}', 400, "prompt", "maximum context length is 512"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens", "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 2.5}', 400, "max_tokens", "integer"),
    (b'{"prompt": "x", "temperature": -0.5}', 400, "temperature", "[0, 2]"),
    (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature", "expected a number"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "temperature", "[0, 2]"),
    (b'{"prompt": "x", "top_p": 0}', 400, "top_p", "(0, 1]"),
    (b'{"prompt": "x", "top_p": 1.5}', 400, "top_p", "(0, 1]"),
    (b'{"prompt": "x", "stop": [""]}', 400, "stop", "non-empty"),
    (b'{"prompt": "x", "stop": 3}', 400, "stop", "string"),
    (b'{"prompt": "x", "seed": "1"}', 400, "seed", "integer"),
    (b'{"prompt": "x", "seed": 123456789012345678901234567890}', 400, "seed", "64-bit"),
    (b'{"prompt": "x", "n": 3}', 400, "n", "n = 1"),
    (b'{"prompt": "x", "logprobs": 1}', 400, "logprobs", "not supported"),
    (b'{"prompt": "x", "presence_penalty": 0.5}', 400, "presence_penalty", "not supported"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options", "stream = true"),
    (b'{"prompt": []}', 400, "prompt", "empty"),
    (b'{"prompt": ""}', 400, "prompt", "empty"),
    (b'{"prompt": [5, 99999]}', 400, "prompt", "token ids"),
])
def test_completion_errors(server, body, status, param, words):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    err = _error(r, status)
    assert err["param"] == param and words in err["message"], err


def test_chat_errors_routes_and_openai_exceptions(server):
    url = server.url
    for body, words in [({"messages": []}, "at least 1"), ({"messages": [{"content": "x"}]}, "role"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text"),
                        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 600}, "context")]:
        err = _error(httpx.post(url + "/v1/chat/completions", json=body), 400)
        assert words in err["message"], (body, err)
    _error(httpx.get(url + "/v1/nothing"), 404)
    _error(httpx.get(url + "/v1/completions"), 405)
    c = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="alpha", prompt="x", temperature=3)
    # the server still answers normally
    assert c.completions.create(model="alpha", prompt="x", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_api_key_on_every_route(tiny):
    model_dir, ads = tiny
    eng, _ = make_engine(model_dir, ads)
    with Server(eng, api_key="s3cret", allow_adapter_loading=True) as srv:
        routes = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                  ("POST", "/v1/chat/completions"), ("POST", "/v1/load_lora_adapter"),
                  ("POST", "/v1/unload_lora_adapter")]
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Bearer s3cretX"}, {"Authorization": "Bearer s3crét".encode()}):
                err = _error(httpx.request(method, srv.url + path, headers=headers, json={}), 401)
                assert err["type"] == "AuthenticationError"
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(srv.url + "/health", headers=ok).status_code == 200
        assert httpx.get(srv.url + "/metrics", headers=ok).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        c = srv.client(api_key="s3cret")
        assert {m.id for m in c.models.list().data} == {"tiny", "alpha", "beta"}
        r = c.completions.create(model="beta", prompt="x", max_tokens=3)   # sampled: may stop at EOS early
        assert r.choices[0].finish_reason in ("length", "stop") and 1 <= r.usage.completion_tokens <= 3


def test_request_body_bound(tiny):
    model_dir, _ = tiny
    eng, _ = make_engine(model_dir, {})
    with Server(eng, max_body_bytes=2000) as srv:
        big = json.dumps({"prompt": "x" * 5000}).encode()
        _error(httpx.post(srv.url + "/v1/completions", content=big, headers={"content-type": "application/json"}),
               413)
        # a chunked body (no Content-Length) is cut off too
        _error(httpx.post(srv.url + "/v1/completions", content=iter([big[:1500], big[1500:]]),
                          headers={"content-type": "application/json"}), 413)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def test_full_queue_answers_429(tiny):
    model_dir, ads = tiny
    eng, tok = make_engine(model_dir, ads, max_batch=1, max_queued=1)
    with Server(eng) as srv:
        c = srv.client()
        box = {}
        with Paused(eng):
            t = threading.Thread(target=lambda: box.update(r=c.completions.create(model="alpha", prompt="queued",
                                                                                     max_tokens=4, temperature=0)))
            t.start()
            wait_until(lambda: eng.load_info()["waiting"] == 1)
            with pytest.raises(openai.RateLimitError, match="max-queued"):
                c.completions.create(model="beta", prompt="x", max_tokens=2)
            r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert _error(r, 429)["type"] == "RateLimitError"
        t.join(60)
        assert box["r"].choices[0].text == reference_text(model_dir, ads["alpha"], tok.encode("queued"), 4)
        assert metric_value(eng, "lorart_requests_rejected_total", reason="queue_full") == 2
        assert c.completions.create(model="beta", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_cancels_streaming_and_plain_requests(tiny):
    model_dir, ads = tiny
    eng, _ = make_engine(model_dir, ads)
    # >= 5 ms per step: 500 tokens take >= 2.5 s, far longer than the client stays
    eng.model.model.layers[0].register_forward_pre_hook(lambda m, a: time.sleep(0.005))
    with Server(eng) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"model": "alpha", "prompt": "x", "max_tokens": 500, "temperature": 0, "stream": True}) as r:
            next(r.iter_lines())  # the first token arrived: the request is running; now hang up
        wait_until(lambda: metric_value(eng, "lorart_requests_total", model="alpha", outcome="cancelled") == 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", timeout=0.3,
                       json={"model": "beta", "prompt": "x", "max_tokens": 500, "temperature": 0})  # greedy: no early EOS
        wait_until(lambda: metric_value(eng, "lorart_requests_total", model="beta", outcome="cancelled") == 1)
        wait_until(lambda: eng.load_info() == {"waiting": 0, "running": 0})
        assert metric_value(eng, "lorart_generation_tokens_total", model="alpha") < 500
        assert metric_value(eng, "lorart_generation_tokens_total", model="beta") < 500
        # queued requests are dropped too when their client leaves
        with Paused(eng):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/completions", timeout=0.3, json={"model": "alpha", "prompt": "x"})
            time.sleep(0.1)
        wait_until(lambda: metric_value(eng, "lorart_requests_total", model="alpha", outcome="cancelled") == 2)


def test_failing_adapter_folder_and_failing_forward(tiny, tmp_path):
    model_dir, ads = tiny
    moved = str(tmp_path / "alpha")
    shutil.copytree(ads["alpha"], moved)
    eng, tok = make_engine(model_dir, {"alpha": moved, "beta": ads["beta"]}, max_adapters=1)  # alpha: evicted
    with Server(eng) as srv:
        c = srv.client()
        with open(os.path.join(moved, "adapter_model.safetensors"), "r+b") as f:
            f.write(b"\xff" * 16)  # corrupted on disk after registration
        with pytest.raises(openai.InternalServerError, match="could not be loaded"):
            c.completions.create(model="alpha", prompt="x", max_tokens=2)
        ok = c.completions.create(model="beta", prompt="y", max_tokens=3, temperature=0).choices[0].text
        assert ok == reference_text(model_dir, ads["beta"], tok.encode("y"), 3)
        # a forward that raises fails the batch with a 500, and the server goes on
        calls = []

        def boom(module, args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("simulated kernel failure")
        h = eng.model.model.layers[0].register_forward_pre_hook(boom)
        try:
            with pytest.raises(openai.InternalServerError, match="simulated kernel failure"):
                c.completions.create(model="tiny", prompt="z", max_tokens=3)
            assert c.completions.create(model="tiny", prompt="z", max_tokens=3,
                                        temperature=0).choices[0].text == reference_text(model_dir, None,
                                                                                         tok.encode("z"), 3)
        finally:
            h.remove()
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_metrics_and_health(server):
    from prometheus_client.parser import text_string_to_metric_families
    c = server.client()
    c.completions.create(model="alpha", prompt="x", max_tokens=3)
    h = httpx.get(server.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("lorart_requests", "lorart_prompt_tokens", "lorart_generation_tokens", "lorart_queue_depth",
                 "lorart_running_requests", "lorart_batch_size", "lorart_request_latency_seconds",
                 "lorart_time_to_first_token_seconds", "lorart_step_seconds", "lorart_adapters_resident",
                 "lorart_requests_rejected"):
        assert name in fams, name
    gen = {s.labels["model"]: s.value for s in fams["lorart_generation_tokens"].samples
           if s.name.endswith("_total")}
    assert gen["alpha"] >= 3


def _serve_cli(*args):
    env = dict(os.environ, PYTHONPATH=PYDIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "lorart", "serve", "--threads", "1", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_sigterm_drains_then_exits(tiny):
    """`lorart serve --method qlora` (NF4 base) in a subprocess: SIGTERM mid-stream finishes the stream, then exit 0."""
    model_dir, ads = tiny
    p = _serve_cli("--model", model_dir, "--port", 0, "--adapter", f"alpha={ads['alpha']}", "--method", "qlora")
    try:
        line = p.stderr.readline()
        assert "on http://127.0.0.1:" in line, line + p.stderr.read()
        url = line.strip().rsplit(" ", 1)[-1]
        with httpx.stream("POST", url + "/completions", timeout=60,
                          json={"model": "alpha", "prompt": "drain me", "max_tokens": 300, "temperature": 0,
                                "stream": True}) as r:
            lines = r.iter_lines()
            first = next(lines)
            p.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # no new connections while draining
                httpx.get(url + "/models", timeout=5)
            rest = [x for x in lines if x]
        events = [json.loads(x[6:]) for x in [first, *rest] if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        from lorart.models import load_model
        tok = load_model(model_dir)[1]
        text = "".join(e["choices"][0]["text"] for e in events)
        assert text == reference_text(model_dir, ads["alpha"], tok.encode("drain me"), 300, quantize=True)
        assert p.wait(60) == 0
        assert "stopped" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


def test_cli_errors_are_one_line(tiny, tmp_path):
    model_dir, ads = tiny
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        cases = [(["--adapter", "a=/nonexistent/x"], "argument --adapter a=/nonexistent/x: /nonexistent/x: no such"),
                 (["--adapter", f"a={ads['alpha']}", "--adapter", f"a={ads['beta']}"], "given twice"),
                 (["--adapter", f"model={ads['alpha']}"], "base model's name"),
                 (["--port", busy.getsockname()[1]], "cannot listen on 127.0.0.1"),
                 (["--adapter", f"a={tmp_path}"], "adapter_config.json: missing")]
        for extra, words in cases:
            p = _serve_cli("--model", model_dir, "--port", 0, *extra)
            out, err = p.communicate(timeout=120)
            assert p.returncode == 2, (extra, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("lorart: error: ") and words in lines[0], (extra, err)
        p = _serve_cli("--adapter", "noequals")  # argparse's own error (usage, then the error line)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and "expected NAME=DIR" in err.strip().splitlines()[-1]
    finally:
        busy.close()


@pytest.fixture(scope="module")
def tok(tiny):
    from lorart.models import load_model
    return load_model(tiny[0])[1]


def test_text_stream_stop_strings_and_split_utf8(tok):
    ids = tok.encode("Hello world, the sea is blue. Bye")
    s = TextStream(tok, ("sea is",))
    out = []
    for t in ids:
        stopped = s.push(t)
        out.append(s.release())
        if stopped:
            break
    s.finish()
    out.append(s.release(final=True))
    assert "".join(out) == s.text == "Hello world, the " and s.stopped == "sea is"
    # a multi-byte character split over byte-level tokens is released whole, never as U+FFFD
    ids = tok.encode("é€😀 ok")
    assert len(ids) > 4
    s = TextStream(tok)
    parts = []
    for t in ids:
        s.push(t)
        parts.append(s.release())
    s.finish()
    parts.append(s.release(final=True))
    assert "".join(parts) == "é€😀 ok" and all("\ufffd" not in x for x in parts)
    # the held-back tail of a possible stop string is released at the end
    s = TextStream(tok, ("xyz!",))
    for t in tok.encode("abc xy"):
        s.push(t)
    assert not s.release().endswith("xy")
    s.finish()
    assert s.release(final=True).endswith("xy") and s.stopped is None
