"""Chat-format pool rows: rendered with the base model's own chat template, bad rows named by file and line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from harp.chat import ChatTemplate
from harp.contracts import DataContractError, load_pool

# A small chat template, so the rendering can be written out by hand below.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def chat_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model's tokenizer with a chat template (a chat model's folder, without the weights)."""
    out = tmp_path / "chat_model"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy2(tiny_model_dir / name, out / name)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return out


def _chat(i: int, *turns: tuple[str, str]) -> dict:
    return {"example_id": f"c{i}", "messages": [{"role": r, "content": c} for r, c in turns], "topic": "t"}


ROWS = [_chat(0, ("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4")),
        _chat(1, ("user", "Capital of France?"), ("assistant", "Paris"))]


def test_chat_rows_render_with_the_models_template_and_keep_their_messages(chat_model, tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pool = load_pool(path, render=ChatTemplate(str(chat_model)))
    assert pool["prompt"].to_list() == ["<|system|>Be brief.\n<|user|>What is 2+2?\n<|assistant|>",
                                        "<|user|>Capital of France?\n<|assistant|>"]
    assert pool["response"].to_list() == ["4", "Paris"]
    assert pool["messages"].to_list() == [r["messages"] for r in ROWS] and pool["topic"].to_list() == ["t", "t"]
    # Parquet holds them the same way
    pl.DataFrame(ROWS).write_parquet(tmp_path / "pool.parquet")
    again = load_pool(tmp_path / "pool.parquet", render=ChatTemplate(str(chat_model)))
    assert again.select("example_id", "prompt", "response").equals(pool.select("example_id", "prompt", "response"))


def test_every_bad_chat_row_is_named_with_its_line_before_any_is_rendered(chat_model, tmp_path):
    bad = [ROWS[0],
           _chat(1, ("user", "Hi"), ("user", "Anyone?")),                    # ends with a user turn
           _chat(2, ("robot", "beep"), ("assistant", "boop")),               # unknown role
           _chat(3, ("assistant", "unprompted")),                            # no user turn
           {"example_id": "c4", "messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    calls = []

    def render(messages):
        calls.append(messages)
        return "p", "r"

    with pytest.raises(DataContractError) as err:
        load_pool(path, render=render)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "4 bad chat row(s)" in msg
    assert "row 1 (line 2): the last message must be a non-blank assistant turn" in msg
    assert "row 2 (line 3): messages[0] has role 'robot'" in msg
    assert "row 3 (line 4): no user turn" in msg
    assert "row 4 (line 5): messages[0] must be an object with string `role` and `content`" in msg
    assert calls == []  # nothing rendered from a file with a bad row


def test_a_model_without_a_chat_template_is_refused_clearly(tiny_model_dir, tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(DataContractError, match="has no chat template"):
        load_pool(path, render=ChatTemplate(str(tiny_model_dir)))
    # prompt/response rows never load the tokenizer
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"example_id": f"p{i}", "prompt": "q", "response": "a"}) + "\n"
                             for i in range(3)))
    template = ChatTemplate(str(tmp_path / "no-such-model"))
    assert load_pool(plain, render=template).height == 3 and template._tokenizer is None


@pytest.mark.slow
def test_the_pool_asset_renders_chat_rows_with_the_finetuners_base_model(chat_model, tmp_path, monkeypatch):
    import dagster as dg

    from harp import store
    from harp_assets.sources import pool_examples
    from harp_resources import FinetunerResource, LineageResource, PoolSourceResource

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    rows = [_chat(i, ("user", f"question {i}"), ("assistant", f"answer {i}")) for i in range(12)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lineage = LineageResource(root=str(tmp_path / "harp"))
    result = dg.materialize([pool_examples], resources={
        "pool_source": PoolSourceResource(pool_path=str(tmp_path / "pool.jsonl"), eval_path="unused"),
        "lineage": lineage, "finetuner": FinetunerResource(base_model=str(chat_model))})
    assert result.success
    pool, _ = store.load_pool_artifact(lineage)
    assert pool["prompt"][3] == "<|user|>question 3\n<|assistant|>" and pool["response"][3] == "answer 3"
