"""``benchmarks/quant_agreement.py`` end to end on `tiny`: the lm_head choice measured."""

from __future__ import annotations

from benchmarks import quant_agreement


def test_lm_head_variants_reported(tmp_path):
    out = tmp_path / "report.md"
    argv = ["--preset", "tiny", "--workdir", str(tmp_path), "--tokens", "4", "--lm-head"]
    argv += ["--variants", "int4,contrib-int4,contrib-int4-lm,contrib-int4-lm8", "--step-reps", "2"]
    assert quant_agreement.main([*argv, "--step-past", "8", "--out", str(out)]) == 0
    rows: dict[str, str] = {}
    for line in out.read_text().splitlines():  # the agreement table (the first one)
        if line.startswith("| ") and not line.startswith("| variant"):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert {"fp32", "int4", "contrib-int4", "contrib-int4-lm"} <= set(rows)
    assert "lm_head too" in rows["contrib-int4-lm"] and "lm_head" not in rows["contrib-int4"]
    assert "lm_head int8" in rows["contrib-int4-lm8"]
    # Text-head forced agreement (lm_head runs every step), for every variant: int8's head
    # errs less than int4's on the same text logits.
    header = next(ln for ln in out.read_text().splitlines() if ln.startswith("| variant |"))
    col = [c.strip() for c in header.split("|")].index("text logit err")
    err = {n: float(r.split("|")[col]) for n, r in rows.items() if n.startswith("contrib")}
    assert 0 < err["contrib-int4-lm8"] < err["contrib-int4-lm"]
    assert "int8" not in rows  # --variants: only those (and fp32) ran
    # Speed: each variant alone in its own process (prefill, text step, time step).
    text = out.read_text()
    table = text[text.index("Each variant alone, in its own process") :].splitlines()
    rows_ = [ln for ln in table if ln.startswith("| ") and "---" not in ln]
    timed = {ln.split("|")[1].strip(): ln for ln in rows_}
    assert {"fp32", "int4", "contrib-int4", "contrib-int4-lm"} <= set(timed)
    for name in ("fp32", "contrib-int4"):
        cells = [c.strip() for c in timed[name].split("|")[2:-1]]
        assert len(cells) == 4 and all(float(c.rstrip("x")) > 0 for c in cells), cells
