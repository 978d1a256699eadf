import pytest

from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import PromptPair, parse_jsonl, tokenize_pair, load_prompt_set


def test_malformed_lines_are_reported_and_valid_lines_load(tmp_path):
    text = "\n".join([
        '{"id": "a", "clean": "w1 w2", "corrupted": "w1 w3", "clean_answer": "w4", "corrupted_answer": "w5"}',
        '{"clean": "w1", "corrupted": "w2"',
        '{"clean": "w1", "corrupted": "w2", "clean_answer": "w4"}',
        '[1, 2]',
        '{"clean": "w1", "corrupted": "w2", "clean_answer": "w4", "corrupted_answer": "w5", "category": "odd"}',
        '',
        '{"clean": "w1", "corrupted": "w2", "clean_answer": "w4", "corrupted_answer": "w5", "category": "control"}',
    ])
    ps = parse_jsonl(text)
    assert [p.id for p in ps.pairs] == ["a", "line7"]
    assert [e.split(":")[0] for e in ps.errors] == ["line 2", "line 3", "line 4", "line 5"]
    assert "corrupted_answer" in ps.errors[1] and "category" in ps.errors[3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ExplorerInputError, match="no valid pairs.*line 1"):
        load_prompt_set(bad)
    with pytest.raises(ExplorerInputError, match="does not exist"):
        load_prompt_set(tmp_path / "missing.jsonl")


def test_token_table_marks_differing_positions(demo_model):
    tp = tokenize_pair(demo_model.tokenizer, PromptPair("Man has three fruits", "Man has four fruits", "Peach", "Mango"))
    table = tp.token_table()
    assert list(table["differs"]) == [False, False, False, True, False]  # <bos> first
    assert tp.differing_positions == [3]
    assert tp.position_labels()[3] == "3:three/four *"


def test_answer_must_be_one_token(tiny_model):
    from explorer.sources.tiny import word_level_tokenizer
    tok = word_level_tokenizer(["w1", "w2"])
    with pytest.raises(ExplorerInputError, match=r"2 tokens, not one: 'w1' \| 'w2'"):
        tokenize_pair(tok, PromptPair("w1", "w2", "w1 w2", "w1"))
    with pytest.raises(ExplorerInputError, match="clean prompt is empty"):
        tokenize_pair(tok, PromptPair("  ", "w2", "w1", "w2"))
    with pytest.raises(ExplorerInputError, match="corrupted answer is empty"):
        tokenize_pair(tok, PromptPair("w1", "w2", "w1", ""))


def test_a_prompt_set_that_is_not_utf8_is_one_message(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"clean": "caf\u00e9", "corrupted": "b", "clean_answer": "x", "corrupted_answer": "y"}\n'
                     .encode("latin-1"))
    with pytest.raises(ExplorerInputError, match="is not UTF-8 text"):
        load_prompt_set(path)
