"""Prompt files (JSONL and parquet, prompt and chat rows) and the training prompt stream."""

from __future__ import annotations

import json

import pytest

from remax_megatron import tiny
from remax_megatron.config_io import ConfigError
from remax_megatron.data.loader import PromptLoader, share_of
from remax_megatron.data.prompts import Prompt, load_prompts


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(300)


ROWS = [{"prompt": "hello world"},
        {"messages": [{"role": "user", "content": "how are you ?"}]}]


def test_jsonl_and_parquet_give_the_same_prompts(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    columns = {key: [row.get(key) for row in ROWS] for key in ("prompt", "messages")}
    pq.write_table(pa.table(columns), tmp_path / "p.parquet")
    a = load_prompts(tmp_path / "p.jsonl", tokenizer)
    b = load_prompts(tmp_path / "p.parquet", tokenizer)
    assert [(p.text, p.ids) for p in a] == [(p.text, p.ids) for p in b]
    assert a[0].ids == tokenizer("hello world").input_ids  # exactly tokenizer(text)
    assert a[1].text == "<|user|>how are you ?\n<|assistant|>"


def test_damaged_files_are_one_line_naming_them(tokenizer, tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "hello"}\n{"prompt": "caf\xe9"}\n')
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"PAR1 this is not a parquet file")
    for path, needle in ((latin1, f"{latin1} line 2 is not UTF-8 (byte 0xe9 at column 16): "
                                  "save the file as UTF-8"),
                         (parquet, f"{parquet} is not a readable parquet file (")):
        with pytest.raises(ConfigError) as err:
            load_prompts(path, tokenizer)
        assert str(err.value).startswith(needle) and "\n" not in str(err.value), str(err.value)


def make(n, length=3):
    return [Prompt(i, f"p{i}", list(range(length + i % 2))) for i in range(n)]


def test_epochs_wrap_and_shuffle_is_seeded():
    loader = PromptLoader(make(10), max_prompt_length=8, global_batch_size=4, seed=1)
    batches = [loader.next_batch() for _ in range(5)]  # 20 = two epochs
    seen = [p.index for b in batches for _, p in b]
    uids = [uid for b in batches for uid, _ in b]
    assert len(set(uids)) == 20  # a prompt seen again in a later epoch gets a new sample id
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new order each epoch
    again = PromptLoader(make(10), max_prompt_length=8, global_batch_size=4, seed=1)
    assert [p.index for _ in range(5) for _, p in again.next_batch()] == seen
    assert loader.state.epoch == 2 and loader.state.cursor == 0


def test_resuming_from_the_state_continues_exactly():
    full = PromptLoader(make(10), 8, 4, seed=3)
    order = [uid for _ in range(6) for uid, _ in full.next_batch()]
    part = PromptLoader(make(10), 8, 4, seed=3)
    first = [uid for _ in range(2) for uid, _ in part.next_batch()]
    resumed = PromptLoader(make(10), 8, 4, seed=3)
    resumed.state = part.state
    rest = [uid for _ in range(4) for uid, _ in resumed.next_batch()]
    assert first + rest == order


def test_long_prompts_are_dropped_and_counted():
    loader = PromptLoader(make(10), max_prompt_length=3, global_batch_size=2, seed=0)
    assert loader.dropped == 5 and all(len(p.ids) <= 3 for p in loader.prompts)
    with pytest.raises(ConfigError, match="only 5 prompts fit"):
        PromptLoader(make(10), max_prompt_length=3, global_batch_size=8, seed=0)


def test_data_parallel_shares_are_disjoint_and_cover_the_batch():
    batch = list(range(12))
    shares = [share_of(batch, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == batch
    assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1:])
