"""per_row against changes of the model's adapter state, and inputs that are not one entry per row.

Each test here failed before its fix: rows silently used a stale or doubled adapter, or raised/misread inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltaw
from deltaw import RowsOpenError
from deltaw.batching import STRATEGIES, per_row
from toy_models import logits_of as _out
from toy_models import randomize, tiny_gpt2, tiny_llama
from toy_models import rows_alone as _alone

TOL = dict(rtol=1e-5, atol=1e-5)
ROWS = ["a", None, "b", {"a": 0.5, "b": -1.0}]


def _llama():
    torch.manual_seed(0)
    m = tiny_llama().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "a")
    deltaw.attach(m, deltaw.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"]), "b")
    randomize(m, "a", seed=1)
    randomize(m, "b", seed=2)
    return m


def test_adapter_state_cannot_change_while_rows_are_open(tmp_path):
    """The plan fixes which adapters are merged and packs their factors on entry: a merge inside used to add
    the adapter twice to its rows, a delete kept applying the deleted adapter."""
    m = _llama()
    deltaw.save(m, tmp_path / "a", "a")
    x = torch.randint(1, 64, (len(ROWS), 5), generator=torch.Generator().manual_seed(0))
    expected = _alone(m, x, ROWS)
    changes = {
        "merge": lambda: deltaw.merge(m, "a"),
        "unmerge": lambda: deltaw.unmerge(m),
        "delete": lambda: deltaw.delete(m, "b"),
        "attach": lambda: deltaw.attach(m, deltaw.LoraConfig(r=2, target_modules=["o_proj"]), "c"),
        "load": lambda: deltaw.load(m, tmp_path / "a", "a2"),
        "merge_and_unload": lambda: deltaw.merge_and_unload(m),
    }
    for verb, change in changes.items():
        if verb == "unmerge":
            deltaw.merge(m, "a")
        with per_row(m, ROWS), torch.no_grad():
            before = _out(m, x)
            with pytest.raises(RowsOpenError, match="per_row"):
                change()
            torch.testing.assert_close(_out(m, x), before, **TOL)
        if verb == "unmerge":
            deltaw.unmerge(m)
        assert deltaw.adapters(m) == ["a", "b"] and not deltaw.merged(m), verb
    torch.testing.assert_close(_alone(m, x, ROWS), expected, **TOL)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "uniform"])
def test_factors_written_inside_an_open_context_are_repacked(strategy):
    m = _llama()
    x = torch.randint(1, 64, (len(ROWS), 5), generator=torch.Generator().manual_seed(0))
    with per_row(m, ROWS, strategy=strategy), torch.no_grad():
        _out(m, x)  # packs the factors
        randomize(m, "b", seed=7)  # copy_ into the parameters: bumps their version counters
        got = _out(m, x)
    torch.testing.assert_close(got, _alone(m, x, ROWS), **TOL)


class _NormedEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, max_norm=1.0)
        self.out = nn.Linear(8, 20)

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_embedding_with_max_norm_rows_match_alone():
    """F.embedding renormalises the rows of the table it is given: a packed table of several adapters is
    renormalised as one and gave other values than each adapter's own table (off by ~1.4)."""
    torch.manual_seed(0)
    m = _NormedEmbeddings().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=3, alpha=6, target_modules=["emb"]), "a")
    deltaw.attach(m, deltaw.LoraConfig(r=2, alpha=2, target_modules=["emb"]), "b")
    randomize(m, "a", std=2.0, seed=1)
    randomize(m, "b", std=2.0, seed=2)
    x = torch.randint(0, 20, (len(ROWS), 6), generator=torch.Generator().manual_seed(0))
    for rows in (ROWS, [{"a": 1.0, "b": 1.0}] * 4):
        expected = _alone(m, x, rows)
        for strategy in STRATEGIES:
            with per_row(m, rows, strategy=strategy), torch.no_grad():
                torch.testing.assert_close(_out(m, x), expected, **TOL, msg=f"{strategy} {rows}")


def test_position_ids_broadcast_over_rows():
    """GPT-2 looks its position embeddings up with ids of shape (1, T) for the whole batch; with an adapter
    on ``wpe`` that raised 'given 3 rows but a layer received a batch of 1' (even with one spec for all)."""
    torch.manual_seed(0)
    m = tiny_gpt2().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=4, alpha=8, target_modules=["wpe", "c_attn"]), "p")
    randomize(m, "p", seed=3)
    x = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    for rows in (["p", "p", "p"], ["p", None, {"p": -0.5}]):
        with per_row(m, rows), torch.no_grad():
            got = _out(m, x)
        torch.testing.assert_close(got, _alone(m, x, rows), **TOL)


def test_a_batch_of_one_activation_is_not_broadcast():
    """Only looked-up ids are broadcast over rows: an activation of batch 1 is the model's own batch, which it
    reshapes with that size downstream (the first broadcast rule expanded Llama's q_proj output and died in a
    torch shape error deep inside the attention)."""
    m = _llama()
    with per_row(m, ["a", None]), torch.no_grad(), pytest.raises(deltaw.DeltawError, match="one entry per row"):
        _out(m, torch.randint(1, 64, (1, 5)))


class _Routed(nn.Module):
    """A toy mixture-of-experts step: the expert sees only the tokens routed to it, as a (tokens, in) matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.expert = nn.Linear(8, 8)

    def forward(self, x):  # x: (B, T, 8)
        flat = x.reshape(-1, 8)
        picked = flat[:1]  # (1, 8): one routed token
        return flat.index_add(0, torch.tensor([0]), self.expert(picked)).view(x.shape)


def test_routed_tokens_are_refused_unless_every_row_shares_the_spec():
    """A (1, in) activation is one routed token, not a batch to broadcast: mixed rows raise; one spec for
    every row applies to whatever the layer sees (any leading dimension)."""
    torch.manual_seed(0)
    m = _Routed().eval()
    deltaw.attach(m, deltaw.LoraConfig(r=2, alpha=4, target_modules=["expert"]), "a")
    randomize(m, "a", seed=1)
    x = torch.randn(2, 3, 8)
    with per_row(m, ["a", None]), torch.no_grad(), pytest.raises(deltaw.DeltawError, match="mixture-of-experts"):
        m(x)
    with deltaw.using(m, "a"), torch.no_grad():
        expected = m(x)
    for strategy in STRATEGIES:
        with per_row(m, ["a", "a"], strategy=strategy), torch.no_grad():
            torch.testing.assert_close(m(x), expected, **TOL)


def test_a_bad_row_spec_is_named_by_its_row():
    """A wrong-typed spec raised "'int' object is not iterable", and a bad weight named the adapter but not the
    row (in a large batch the same adapter is on many rows); nothing is changed either way (found in review)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0"]), "a")
    cases = [([None, 5], TypeError, "row 1: an adapter spec is"), (["a", {"a": "x"}], TypeError, "row 1: the weight"),
             ([{"a": float("nan")}], deltaw.NonFiniteError, "row 0: the weight"),
             ([None, "a", {"a": torch.tensor(True)}], TypeError, "row 2: the weight")]
    for rows, error, message in cases:
        with pytest.raises(error, match=message):
            with per_row(model, rows):
                pass
        assert deltaw.state(model).rows is None and not model._forward_pre_hooks
