"""The decoder behind one replica (`cluster.factory.make_decoder`), and the request
checks that need its tokenizer and limits. Prompts are tokenized here, on a worker
thread (the handler awaits it), so a huge prompt never stalls the event loop."""

from __future__ import annotations

import os

from cluster.engine import encode_prompt, node_of_this_process
from cluster.factory import make_decoder
from cluster.serve.config import ServeArgs


class Backend:
    def __init__(self, args: ServeArgs):
        self.args = args
        spec = args.decoder_spec()
        if spec.kind in ("local", "remote-drafter"):  # the target decodes in this replica
            import torch

            from actors.resources import assigned_cpus

            torch.set_num_threads(assigned_cpus())  # the replica decodes on the CPUs Ray gave it
        self.decoder = make_decoder(spec)
        self.tokenizer, self.context = self.decoder.tokenizer, self.decoder.context_length
        self.vocab_size = len(self.tokenizer)
        # what the models resolved to where they run (dtypes, kernels, devices, nodes): for /health
        self.runtime = {"replica": {"pid": os.getpid(), **node_of_this_process()}, **self.decoder.runtime_info()}

    def encode_text(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat=False)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def check(self, prompt_ids: list[int], max_tokens: int) -> None:
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        if len(prompt_ids) + max_tokens > self.context:
            raise ValueError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                             f"{len(prompt_ids)} tokens and max_tokens is {max_tokens}")
        if len(prompt_ids) + max_tokens > self.args.max_len:
            raise ValueError(f"this endpoint's max_len is {self.args.max_len} tokens (prompt + max_tokens; the "
                             f"context limit it serves); the prompt has {len(prompt_ids)} tokens and max_tokens "
                             f"is {max_tokens}")

    def close(self) -> None:
        self.decoder.close()
