"""``train.curves``: the PNG of a run's metrics, drawn from ``metrics.jsonl``."""

from __future__ import annotations

import json

from train.curves import main, plot_curves, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(path, steps=40, cut=False):
    lines = [json.dumps({"event": "train", "step": s, "loss": 5.0 / s, "accuracy": s / 50})
             for s in range(1, steps + 1)]
    lines += [json.dumps({"event": "eval", "step": s, "tokens_per_iteration": 1.5 + s / 40})
              for s in (0, 20, 40)]
    text = "\n".join(lines) + "\n"
    if cut:  # a line cut off by a kill
        text += '{"event": "train", "st'
    path.write_text(text)
    return path


def test_reads_every_record_and_skips_a_cut_line(tmp_path):
    records = read_metrics(_metrics(tmp_path / "metrics.jsonl", cut=True))
    assert len(records) == 43 and records[-1]["event"] == "eval"


def test_draws_a_png_beside_the_metrics(tmp_path):
    png = plot_curves(_metrics(tmp_path / "metrics.jsonl", cut=True))
    assert png == tmp_path / "curves.png" and png.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]
    before = png.stat().st_size
    _metrics(tmp_path / "metrics.jsonl", steps=80)  # redrawn in place from the new file
    plot_curves(tmp_path / "metrics.jsonl")
    assert png.stat().st_size != before


def test_cli(tmp_path, capsys):
    metrics = _metrics(tmp_path / "metrics.jsonl")
    assert main([str(metrics), str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").read_bytes()[:8] == PNG
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([]) == 2
