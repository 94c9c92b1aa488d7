"""bench/second_order.py on a tiny model: MAML-en-LLM's and FOMAML's meta-gradients differ by a second-order
term that grows with the inner lr (about linearly), and stays a small change of direction."""

from __future__ import annotations

import json

from tests.conftest import make_data_dir, tiny_gpt2


def test_second_order_term_grows_with_the_inner_lr(tmp_path, gpt2_tokenizer):
    from bench import second_order

    tiny_gpt2().save_pretrained(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(tmp_path / "model")
    make_data_dir(tmp_path / "data", k=4)
    out = tmp_path / "so.json"
    args = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--setting", "toy"]
    assert second_order.main([*args, "--tasks", "1", "--warm-steps", "2", "--lrs", "1e-5,1e-3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["moments"], r["inner_lr"]) for r in rows] == [("fresh", 1e-5), ("fresh", 1e-3), ("warm", 1e-5), ("warm", 1e-3)]
    assert rows[2]["moment_step"] == 2 * 1 + 2  # the shared moments after 2 outer steps of K=1 (inner and outer)
    for small, large in ((rows[0], rows[1]), (rows[2], rows[3])):
        a, b = small["maml_vs_fomaml"]["rel_l2"], large["maml_vs_fomaml"]["rel_l2"]
        assert 0 < a < b and 20 < b / a < 500  # 100x the lr: about 100x the term
        assert small["maml_vs_fomaml"]["cosine"] > 0.999
