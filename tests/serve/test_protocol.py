"""Pieces that need no server: incremental detokenisation, stop strings, the metrics text format, settings."""

from __future__ import annotations

import pytest

from deltaw.serve.metrics import Counter, Histogram, Metrics
from deltaw.serve.protocol import IncrementalText, StopMatcher, gen_params
from deltaw.serve.settings import ServeSettings


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator(["héllo wörld", "naïve café", "日本語 テキスト", "emoji 🙂 ok"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_incremental_text_equals_full_decode_with_multibyte_characters():
    tok = byte_level_tokenizer()
    text = "héllo 🙂 日本語 café wörld"
    ids = tok(text)["input_ids"]
    inc = IncrementalText(tok)
    deltas = [inc.add(i) for i in ids] + [inc.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)  # half characters are held back, never streamed


def test_stop_matcher_finds_earliest_and_holds_back_partial_matches():
    m = StopMatcher(["END", "stop here"])
    assert m.find("abc END stop here") == 4
    assert m.find("nothing") is None
    assert m.safe_end("abc sto") == len("abc ")  # "sto" may become "stop here"
    assert m.safe_end("abc EN") == len("abc ")
    assert m.safe_end("abc xyz") == len("abc xyz")
    assert StopMatcher([]).safe_end("abc") == 3


def test_gen_params_defaults_follow_openai():
    p = gen_params({"model": "x"}, default_max_tokens=16, max_tokens_limit=64, max_n=4, chat=False)
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stream, p.explicit_max_tokens) == (16, 1.0, 1.0, 1, False,
                                                                                             False)
    p = gen_params({"model": "x", "max_completion_tokens": 5}, default_max_tokens=None, max_tokens_limit=64, max_n=4,
                   chat=True)
    assert p.max_tokens == 5 and p.explicit_max_tokens


def test_stop_strings_are_bounded():
    """A 1 MB stop string was accepted: holding back its partial matches costs O(len²) per token on the
    server's event loop."""
    from deltaw.serve.errors import APIError
    from deltaw.serve.protocol import MAX_STOP_CHARS

    kw = dict(default_max_tokens=16, max_tokens_limit=64, max_n=4, chat=False)
    assert gen_params({"model": "x", "stop": "a" * MAX_STOP_CHARS}, **kw).stop == ["a" * MAX_STOP_CHARS]
    with pytest.raises(APIError, match="at most 1000 characters") as err:
        gen_params({"model": "x", "stop": ["END", "a" * (MAX_STOP_CHARS + 1)]}, **kw)
    assert err.value.status == 400


def test_metrics_text_format_escapes_and_accumulates():
    c = Counter("x_total", "help", ("adapter",))
    c.inc(adapter='we"ird\\name\n')
    c.inc(2, adapter="a")
    lines = c.render()
    assert lines[:2] == ["# HELP x_total help", "# TYPE x_total counter"]
    assert 'x_total{adapter="a"} 2' in lines and 'x_total{adapter="we\\"ird\\\\name\\n"} 1' in lines
    h = Histogram("h", "help", [1, 2])
    for v in (0.5, 1.5, 5):
        h.observe(v)
    assert h.render()[2:] == ['h_bucket{le="1"} 1', 'h_bucket{le="2"} 2', 'h_bucket{le="+Inf"} 3', "h_sum 7",
                              "h_count 3"]
    assert "deltaw_batch_occupancy_ratio 0" in Metrics(8).render()


def test_settings_validation():
    with pytest.raises(ValueError):
        ServeSettings(batch_policy="round-robin")
    with pytest.raises(ValueError):
        ServeSettings(max_batch_size=0)
    assert ServeSettings(api_key="").api_key is None


@pytest.mark.parametrize("extra,param", [
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy"}}, "audio"),
    ({"function_call": "auto"}, "function_call"), ({"prediction": {"type": "content"}}, "prediction"),
    ({"repetition_penalty": 1.3}, "repetition_penalty"), ({"top_k": 5}, "top_k"), ({"min_p": 0.1}, "min_p"),
    ({"min_tokens": 4}, "min_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without "stream": true
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
])
def test_options_that_would_be_silently_ignored_are_refused(extra, param):
    """These were accepted and ignored: a client asking for audio, a repetition penalty or top_k got plain
    sampling without being told."""
    from deltaw.serve.errors import APIError

    with pytest.raises(APIError) as err:
        gen_params({"model": "x", **extra}, default_max_tokens=16, max_tokens_limit=64, max_n=4, chat=True)
    assert err.value.status == 400 and err.value.param == param
    neutral = {"modalities": ["text"], "top_k": -1, "repetition_penalty": 1.0, "stream": True,
               "stream_options": {"include_usage": True}}
    p = gen_params({"model": "x", **neutral}, default_max_tokens=16, max_tokens_limit=64, max_n=4, chat=True)
    assert p.include_usage is True


def test_every_unsupported_parameter_is_named_in_one_400():
    """The README promises a 400 *naming them*: with logprobs and echo both set, only logprobs was named, so a
    client fixed one, resent, and was refused again for the other."""
    from deltaw.serve.errors import APIError
    from deltaw.serve.protocol import refuse_unsupported

    body = {"model": "x", "logprobs": 2, "echo": True, "best_of": 3, "temperature": 0, "top_k": -1}
    with pytest.raises(APIError) as err:
        gen_params(body, default_max_tokens=16, max_tokens_limit=64, max_n=4, chat=False)
    e = err.value
    assert e.status == 400 and e.code == "unsupported_parameter" and e.param == "logprobs"
    for name in ("'logprobs'", "'echo'", "'best_of'"):
        assert name in e.message, e.message
    assert "temperature" not in e.message and "top_k" not in e.message  # supported / neutral values pass
    with pytest.raises(APIError) as err:  # embeddings: its own 'dimensions' is listed with the shared ones
        refuse_unsupported({"model": "x", "input": "a", "dimensions": 8, "logprobs": 1}, embeddings=True)
    assert "'dimensions'" in err.value.message and "'logprobs'" in err.value.message
    refuse_unsupported({"model": "x", "dimensions": None, "echo": False}, embeddings=True)  # neutral: accepted


def test_settings_refuse_an_unknown_row_strategy():
    """Any string was accepted: a typo started a healthy-looking server whose every adapter request then failed
    with 500 "unknown per_row strategy"."""
    from deltaw.batching import STRATEGIES

    for bad in ("grouped ", "fastest", ""):
        with pytest.raises(ValueError, match="row_strategy must be one of") as err:
            ServeSettings(row_strategy=bad)
        assert all(s in str(err.value) for s in STRATEGIES) and repr(bad) in str(err.value)
    for strategy in STRATEGIES:
        assert ServeSettings(row_strategy=strategy).row_strategy == strategy


def test_temperatures_below_the_smallest_normal_float32_are_refused():
    from deltaw.serve.errors import APIError
    from deltaw.serve.protocol import MIN_TEMPERATURE

    kw = dict(default_max_tokens=16, max_tokens_limit=64, max_n=4, chat=False)
    for t in (4e-39, 1e-45, 5e-324):
        with pytest.raises(APIError, match="0 \\(greedy\\) or at least") as err:
            gen_params({"model": "x", "temperature": t}, **kw)
        assert err.value.status == 400 and err.value.param == "temperature"
    for t in (0, 0.0, MIN_TEMPERATURE, 1e-30, 1e-6, 2):
        assert gen_params({"model": "x", "temperature": t}, **kw).temperature == t


def test_strings_that_cannot_be_utf8_are_refused_naming_the_parameter():
    from deltaw.serve.errors import APIError
    from deltaw.serve.protocol import require_object

    cases = [({"prompt": "\ud800"}, "prompt"), ({"input": ["ok", ["no"], "\udfff"]}, "input[2]"),
             ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "a\ud800b"}]},
              "messages[1].content"),
             ({"metadata": {"k\udc00": "v"}}, "metadata"), ({"\ud800": 1}, None)]
    for body, param in cases:
        with pytest.raises(APIError, match="cannot be encoded as UTF-8") as err:
            require_object({"model": "x", **body})
        assert err.value.status == 400 and err.value.param == param
    deep: list = ["\ud800"]
    for _ in range(5000):  # deeper than the recursion limit: the walk is iterative
        deep = [deep]
    with pytest.raises(APIError) as err:
        require_object({"prompt": deep})
    assert err.value.param.startswith("prompt[0][0]") and err.value.param.endswith("...")
    ok = {"model": "x", "prompt": "h\u00e9llo \U0001f642", "stop": ["\u65e5"], "n": 1, "x": None}
    assert require_object(ok) is ok
