from __future__ import annotations

import pytest

from actors import loading


def test_resolve_refuses_unknown_names_and_lists_builtins():
    with pytest.raises(loading.ModelNotFoundError) as e:
        loading.resolve("no-such-model")
    assert all(name in str(e.value) for name in loading.BUILTINS)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(loading.ModelNotFoundError, match="config.json"):
        loading.resolve(str(tmp_path))


def test_tiny_model_loads_through_the_common_path(tiny_dir):
    m = loading.load(tiny_dir("gemma3"), progress=False)
    assert m.vocab_size == 64 and m.context_length == 512
    assert m.tokenizer.decode(m.tokenizer("abc")["input_ids"]) == "abc"


def test_vocab_check(tiny_dir):
    a = loading.load(tiny_dir("llama"), progress=False)
    b = loading.load(tiny_dir("llama", vocab_size=80), progress=False)
    loading.check_same_vocab(a.tokenizer, a.tokenizer, 64, 64, ("a", "a"))
    with pytest.raises(ValueError, match="vocabulary"):
        loading.check_same_vocab(a.tokenizer, b.tokenizer, 64, 80, ("a", "b"))
    with pytest.raises(ValueError, match="tokenizers"):
        loading.check_same_vocab(a.tokenizer, b.tokenizer, 64, 64, ("a", "b"))


# ---- hub ids: offline unless the user opts in (SPECRAY_ALLOW_DOWNLOAD=1) -------------------
HUB_CHILD = """
import json, sys
from actors import loading
try:
    print(json.dumps({"path": str(loading.resolve(sys.argv[1]))}))
except loading.ModelNotFoundError as e:
    print(json.dumps({"error": str(e)}))
"""


@pytest.fixture
def hub(tmp_path):
    """A local Hugging Face cache, and a hub endpoint on loopback that logs every request."""
    import http.server
    import threading

    requests_seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            requests_seen.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def resolve(name: str, **env) -> dict:
        import json
        import os
        import subprocess
        import sys

        full = {k: v for k, v in os.environ.items() if k != loading.DOWNLOAD_ENV}
        full.update(HF_HUB_CACHE=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
                    HF_HUB_OFFLINE="0", **env)
        proc = subprocess.run([sys.executable, "-c", HUB_CHILD, name], env=full, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    resolve.requests = requests_seen
    resolve.cache = tmp_path / "hf"
    yield resolve
    server.shutdown()


def test_a_hub_id_in_the_local_cache_resolves_without_the_network(hub, tiny_dir):
    import shutil

    repo = hub.cache / "models--specray--tiny"
    shutil.copytree(tiny_dir("llama"), repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    out = hub("specray/tiny")
    assert out.get("path", "").endswith("snapshots/0123abcd"), out
    assert hub.requests == []
    assert loading.load(out["path"], progress=False).vocab_size == 64


def test_an_uncached_hub_id_is_refused_without_a_download_attempt(hub):
    out = hub("specray/not-here")
    assert "local Hugging Face cache" in out["error"] and "SPECRAY_ALLOW_DOWNLOAD=1" in out["error"]
    assert hub.requests == []  # nothing asked the hub


def test_downloads_happen_only_when_the_user_opts_in(hub):
    out = hub("specray/not-here", SPECRAY_ALLOW_DOWNLOAD="1")
    assert "download failed" in out["error"]
    assert any("specray/not-here" in path for path in hub.requests)  # it did ask the hub
