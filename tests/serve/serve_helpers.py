"""Helpers for the server tests (kept out of conftest.py so that ``import`` finds them by a unique name when the
whole suite runs): a tiny random-init Llama (and BERT), an offline WordLevel tokenizer, adapters saved with
``deltaw.save``, real servers (uvicorn on a background thread, loopback, free port), and the offline reference:
greedy ``model.generate`` on a separate copy of the model with the adapter active -- what the server must
reproduce token for token."""

from __future__ import annotations

from pathlib import Path

import torch

import deltaw

ADAPTERS = ("a0", "a1", "a2", "a3")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
WORDS = ["[PAD]", "<s>", "</s>", "[UNK]", "system", "user", "assistant"] + [f"w{i}" for i in range(57)]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                   unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def make_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    return BertModel(cfg, add_pooling_layer=False).eval()


def save_adapters(model, root: Path, names, targets, seed: int = 100) -> None:
    """Random (non-zero B) adapters so every adapter changes the greedy output."""
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules=targets), name)
        with torch.no_grad():
            for p in deltaw.adapter_parameters(model, name):
                p.normal_(0.0, 0.6)
        deltaw.save(model, root / name, name)
        deltaw.delete(model, name)


class Offline:
    """Greedy ``generate`` on a separate model copy with the named adapter active (None: the base)."""

    def __init__(self, root: Path, tokenizer, device: torch.device | str = "cpu") -> None:
        self.model = make_llama().to(device)
        self.tokenizer = tokenizer
        for name in ADAPTERS:
            deltaw.load(self.model, root / name, name, activate=False)
        self._memo: dict = {}

    def ids(self, prompt_ids: list[int], adapter: str | None, max_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), adapter, max_tokens)
        if key not in self._memo:
            with deltaw.using(self.model, adapter), torch.no_grad():
                ids = torch.tensor([prompt_ids], device=self.model.device)
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                          do_sample=False, pad_token_id=0)
            new = out[0, len(prompt_ids):].tolist()
            self._memo[key] = new[:new.index(2)] if 2 in new else new  # the server never emits EOS
        return self._memo[key]

    def text(self, prompt: str, adapter: str | None, max_tokens: int) -> str:
        ids = self.tokenizer(prompt)["input_ids"]
        return self.tokenizer.decode(self.ids(ids, adapter, max_tokens), skip_special_tokens=True)

    def chat(self, messages, adapter: str | None, max_tokens: int) -> str:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return self.tokenizer.decode(self.ids(list(ids), adapter, max_tokens), skip_special_tokens=True)


def start_server(adapters_root: Path | None, tokenizer, model=None, **settings):
    """A started (DeltawServer, ServerThread, url) on 127.0.0.1 and a free port."""
    from deltaw.serve import DeltawServer, ServerThread, ServeSettings

    settings.setdefault("max_wait_ms", 10.0)
    settings.setdefault("base_name", "tiny")
    server = DeltawServer(model if model is not None else make_llama(), tokenizer, adapters_root,
                          ServeSettings(**settings))
    thread = ServerThread(server)
    url = thread.start()
    return server, thread, url


def mixed_requests(seed: int, count: int, max_tokens: tuple[int, int]) -> list[tuple[str, str, int, bool]]:
    """(model, prompt, max_tokens, stream) over the base ("tiny") and every adapter; every third one streams."""
    import random
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        model = rng.choice(("tiny", *ADAPTERS))
        prompt = " ".join(f"w{rng.randrange(57)}" for _ in range(rng.randint(1, 9)))
        requests.append((model, prompt, rng.randint(*max_tokens), i % 3 == 0))
    return requests


def wrong_answers(url: str, requests: list[tuple[str, str, int, bool]], reference: "Offline") -> list:
    """Send ``requests`` (greedy) all at once; those whose completion differs from the reference's, with it."""
    bodies = [{"model": m, "prompt": p, "max_tokens": n, "temperature": 0, "stream": stream}
              for m, p, n, stream in requests]
    got = []
    for status, body in concurrently(url, bodies):
        assert status == 200, body
        got.append(body["choices"][0]["text"] if isinstance(body, dict)
                   else "".join(e["choices"][0]["text"] for e in body[:-1]))
    return [(req, g) for req, g in zip(requests, got)
            if g != reference.text(req[1], None if req[0] == "tiny" else req[0], req[2])]


def concurrently(url: str, bodies: list[dict], path: str = "/v1/completions", limit: int = 16) -> list:
    """POST every body at once from one asyncio client (threads would fight the server for the GIL).

    Returns (status, parsed JSON) per body; for "stream": true bodies the JSON is the list of SSE events."""
    import asyncio
    import json as _json

    import httpx

    async def main() -> list:
        sem = asyncio.Semaphore(limit)
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(body: dict):
                async with sem:
                    if not body.get("stream"):
                        r = await client.post(url + path, json=body)
                        return r.status_code, r.json()
                    async with client.stream("POST", url + path, json=body) as s:
                        events = []
                        async for line in s.aiter_lines():
                            if line.startswith("data: "):
                                data = line[6:]
                                events.append(data if data == "[DONE]" else _json.loads(data))
                        if s.status_code != 200:
                            return s.status_code, _json.loads(await s.aread() or b"{}")
                        return s.status_code, events
            return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(main())
