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


def test_geometry_study_records_each_cell_and_resumes(tmp_path, gpt2_tokenizer):
    """The geometry study on a tiny model: a cell per line of cells.jsonl, the warm state saved, and a second
    run skips the finished cells (a long study resumes after its session ends)."""
    from bench import second_order, so_geometry

    tiny_gpt2().save_pretrained(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(tmp_path / "model")
    make_data_dir(tmp_path / "data", k=4, n_train=3)
    out = tmp_path / "geo"
    args = ["geometry", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--setting", "toy"]
    args += ["--tasks", "2", "--warm-steps", "2", "--lrs", "1e-4,1e-3", "--only", "/K1/start-S/eps1e-08", "--out", str(out)]
    assert second_order.main([*args, "--max-cells", "3"]) == 0
    first = so_geometry.read_cells(out)
    assert [r["key"] for r in first] == [
        "fresh/adamw/lr0.0001/K1/start-S/eps1e-08",
        "fresh/adamw/lr0.001/K1/start-S/eps1e-08",
        "warm/adamw/lr0.0001/K1/start-S/eps1e-08",
    ]
    assert (out / "warm" / "done.json").is_file() and first[2]["moment_step"] == 2 * 1 + 2
    assert second_order.main(args) == 0  # resumes: the one warm cell left, from the saved warm state
    rows = so_geometry.read_cells(out)
    assert len(rows) == 4 and rows[:3] == first
    for r in rows:
        assert len(r["rho"]) == 2 and -1 <= r["signal"] <= 1
        assert set(r["meta_share"]) == {"shared_clip1", "shared_clip0", "init_clip0"}
        assert r["meta_share_inner_clip1"] is not None and set(r["post_step"]) >= {"theta", "fomaml", "maml_en_llm"}
    for state in ("fresh", "warm"):  # the second-order term grows with the inner lr (prediction 1), in both states
        small, large = (sum(r["rho"]) for r in rows if r["state"] == state)
        assert 0 < small < large
    assert "| warm | adamw | 0.001 | 1 | S |" in so_geometry.table(rows)
