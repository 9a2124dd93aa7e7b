"""`serve run deploy/serve.yaml` as shipped (only the port moved off 8000), on the real
built-in pair, through the official `openai` client. The models load in the actors
only: this process loads nothing."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import openai
import pytest
import yaml
from ray_head import VENV_BIN, free_port, ray_head, stop
from test_serve_app import wait_healthy

pytestmark = pytest.mark.builtin
REPO = Path(__file__).parents[2]


def test_shipped_config_serves_the_builtin_pair_losslessly(tmp_path):
    config = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    port = config["http_options"]["port"] = free_port()
    # A fixed draft length: the shipped adaptive choice may rightly not draft on a box this
    # busy (another xdist worker), and this test asserts that drafts are accepted.
    config["applications"][0]["args"]["draft_length"] = 4
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    model = config["applications"][0]["args"]["served_model_name"]
    with ray_head(tmp_path / "head.log", num_cpus=2) as head:
        log = tmp_path / "serve.log"
        with log.open("w") as out:
            proc = subprocess.Popen([str(VENV_BIN / "serve"), "run", str(tmp_path / "serve.yaml")], cwd=REPO,
                                    env={**head.env, "RAY_ADDRESS": head.address}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy([f"{base}/health"], proc, log, timeout=900)  # a first run converts the GGUFs
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
            messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
            ask = dict(model=model, messages=messages, max_tokens=32, temperature=0)
            spec = client.chat.completions.create(**ask)
            streamed = client.chat.completions.create(**ask, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            alone = client.chat.completions.create(**ask, extra_body={"specray": {"speculative": False}})
        finally:
            stop(proc, signal.SIGINT)
    assert spec.choices[0].message.content == text == alone.choices[0].message.content
    assert "def" in text
    assert spec.model_extra["specray"]["mean_accepted"] > 1.2  # the draft really helped
    assert alone.model_extra["specray"]["drafted_tokens"] == 0
