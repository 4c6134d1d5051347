"""`data prepare` beyond byte tokens: .jsonl and .parquet inputs, Hugging Face tokenizers (given or
trained), uint16/uint32 shards read back through TokenDataset, the sampler and the node cache, and
one short training run on a BPE dataset. Byte-token output is pinned to what it always was."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from common.errors import DataError
from dataloading.dataset import TokenDataset
from dataloading.index import read_index
from dataloading.prepare import is_val, prepare
from orchestrator.cli import main
from tests.conftest import STDLIB, cli_json, run_cli, tiny_config

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
QUIET = {"log": lambda *a: None}


def write_corpus(root: Path) -> None:
    """Deterministic text files in a small tree, plus one binary file and one file --include skips."""
    for k, name in enumerate(["a.txt", "b.md", "sub/c.py", "sub/deeper/d.txt", "e.rst", "f.txt", "g.txt", "h.py"]):
        lines = [f"{name} {i}: " + " ".join(WORDS[(i * 7 + j * (k + 3)) % len(WORDS)] for j in range(9))
                 for i in range(40 + 25 * k)]
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(lines) + "\n")
    (root / "bin.txt").write_bytes(b"abc\x00def" * 10)
    (root / "skip.json").write_text("{}")


def records(n: int) -> list[str]:
    return [f"record {i}: " + " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3 + i % 11)) + " é"
            for i in range(n)]


def train_tokens(uri: str, split: str = "train") -> np.ndarray:
    """Every token of a split, in id order, as the reader sees them."""
    ds = TokenDataset(uri, split)
    return ds.batch(np.arange(len(ds))).numpy().reshape(-1)


def expected_stream(keys_and_texts: list[tuple[str, str]], val_fraction: float, sep: bytes = b"\n") -> dict:
    """Byte tokens per split as the format promises: per-record hash split, newline after each."""
    out = {"train": b"", "val": b""}
    for key, text in keys_and_texts:
        out["val" if is_val(key, val_fraction) else "train"] += text.encode() + sep
    return out


# --- byte tokens: unchanged -----------------------------------------------------------------------

# index.json (which holds every shard's sha256) of write_corpus prepared by the byte-token writer
# before tokenizers existed; any change to byte-token output changes these.
PINNED = {
    (33, 0.2, 0.002): "c6cf9e96d659701bbaba06205f311c1fd9b3c09d8c425013341b0c273d76a235",
    (129, 0.01, 16.0): "161b70f1c678683118d9ce436dd586222a33c517b6f8488034b1c80b918a3289",
}


@pytest.mark.parametrize("seq_len, val_fraction, shard_mb", list(PINNED))
def test_byte_tokens_are_unchanged(tmp_path, seq_len, val_fraction, shard_mb):
    src, out = tmp_path / "src", tmp_path / "out"
    write_corpus(src)
    index = prepare([str(src)], str(out), seq_len=seq_len, val_fraction=val_fraction, shard_mb=shard_mb, **QUIET)
    raw = (out / "index.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == PINNED[(seq_len, val_fraction, shard_mb)]
    assert "tokenizer" not in json.loads(raw) and not (out / "tokenizer.json").exists()
    assert index.dtype == "uint8" and index.vocab_size == 256
    for split in ("train", "val"):
        for s in index.shards(split):
            assert hashlib.sha256((out / s.name).read_bytes()).hexdigest() == s.sha256


def test_cli_defaults_give_the_same_byte_dataset(tmp_path, home, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_corpus(src)
    assert main(["data", "prepare", str(src), "--out", str(out)]) == 0
    assert hashlib.sha256((out / "index.json").read_bytes()).hexdigest() == PINNED[(129, 0.01, 16.0)]
    printed = capsys.readouterr().out
    assert "skipped 1 files that look binary" in printed and "train: 7 documents" in printed


# --- jsonl and parquet ----------------------------------------------------------------------------


def test_jsonl_records_are_documents_split_by_record(tmp_path):
    texts = records(300)
    lines = [json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)]
    lines.insert(10, "")  # blank lines are skipped, line numbers still count them
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    prepare([str(tmp_path / "c.jsonl")], out, seq_len=17, val_fraction=0.2, text_field="body", **QUIET)
    numbered = [(f"c.jsonl:{n}", t) for n, t in zip([*range(1, 11), *range(12, 302)], texts, strict=True)]
    want = expected_stream(numbered, 0.2)
    assert want["val"] and want["train"]  # both splits really get records
    for split in ("train", "val"):
        got = train_tokens(out, split)
        assert bytes(got.astype(np.uint8)) == want[split][: len(got)] and len(want[split]) - len(got) < 17


def test_parquet_is_read_row_group_by_row_group(tmp_path, monkeypatch):
    texts = records(500)
    texts[7] = None  # nulls and empty strings are no documents
    texts[8] = ""
    table = pa.table({"n": list(range(500)), "content": texts})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=64)

    def whole(*a, **k):
        raise AssertionError("prepare loaded a whole parquet file")

    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    out = str(tmp_path / "out")
    prepare([str(tmp_path)], out, seq_len=33, val_fraction=0.1, text_field="content", include=["*.parquet"], **QUIET)
    want = expected_stream([(f"p.parquet:{i}", t) for i, t in enumerate(texts) if t], 0.1)
    for split in ("train", "val"):
        got = train_tokens(out, split)
        assert bytes(got.astype(np.uint8)) == want[split][: len(got)] and len(want[split]) - len(got) < 33


def test_progress_lines_while_reading(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records(3000)))
    lines: list[str] = []
    prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "out"), seq_len=33, progress_mb=0.02, log=lines.append)
    progress = [x for x in lines if "MB read" in x]
    assert len(progress) >= 4, lines
    assert lines[-1].startswith("wrote ") and any(x.startswith("train: ") for x in lines)


# --- bad input: one line naming the file ------------------------------------------------------------


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _jsonl(tmp_path, *lines: str) -> str:
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _parquet(tmp_path, **columns) -> str:
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), p)
    return str(p)


def _tokenizer_file(tmp_path, text: str) -> str:
    p = tmp_path / "tokenizer.json"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("make, extra, expected", [
    (lambda t: _jsonl(t, '{"text": "a"}', '{"text": "b"', '{"text": "c"}'), [], "bad.jsonl:2: not valid JSON"),
    (lambda t: _jsonl(t, '{"text": "a"}', '{"text": "b"}', '{"body": "c", "id": 3}'), [],
     "bad.jsonl:3: no 'text' field (fields: 'body', 'id'; choose one with --text-field)"),
    (lambda t: _jsonl(t, '{"text": 5}'), [], "bad.jsonl:1: field 'text' is int, not a string"),
    (lambda t: _jsonl(t, '["text"]'), [], "bad.jsonl:1: expected a JSON object"),
    (lambda t: _jsonl(t, '{"text": "a"}'), ["--text-field", "body"], "bad.jsonl:1: no 'body' field (fields: 'text'"),
    (lambda t: _parquet(t, body=["x", "y"], n=[1, 2]), [], "bad.parquet: no column 'text' (columns: body, n;"),
    (lambda t: _parquet(t, text=[1, 2]), [], "bad.parquet: column 'text' is int64, not text"),
    (lambda t: _jsonl(t, "", "  "), [], "no text in the inputs (1 files, all empty or binary)"),
    (lambda t: _jsonl(t, '{"text": "a"}'), ["--tokenizer", "/nonexistent/tokenizer.json"],
     "/nonexistent/tokenizer.json: tokenizer file not found"),
    (lambda t: _jsonl(t, '{"text": "a"}'), ["--tokenizer", "{tmp}/tokenizer.json"],
     "tokenizer.json: not a valid Hugging Face tokenizer.json"),
    (lambda t: _jsonl(t, '{"text": "a"}'), ["--train-tokenizer", "100"], "the vocabulary needs at least 257 entries"),
    (lambda t: _jsonl(t, '{"text": "a"}'), ["--eos", "</s>"], "--eos needs --tokenizer or --train-tokenizer"),
    (lambda t: _jsonl(t, '{"text": "a"}'), ["--tokenizer", "x", "--train-tokenizer", "300"], "not allowed with argument"),
])
def test_bad_input_is_one_line(tmp_path, home, capsys, make, extra, expected):
    _tokenizer_file(tmp_path, '{"version": "1.0", "model": {"type": "Nope"}')  # corrupt: cut short
    src = make(tmp_path)
    argv = ["data", "prepare", src, "--out", str(tmp_path / "out"), *[x.format(tmp=tmp_path) for x in extra]]
    assert expected in one_line_error(capsys, argv)
    assert not (tmp_path / "out" / "index.json").exists()


def test_byte_tokens_need_no_tokenizers_package(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records(200)))
    assert prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "o"), seq_len=33, **QUIET).dtype == "uint8"
    with pytest.raises(DataError, match=r"need the `tokenizers` package \(pip install tokenizers\)"):
        prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "o2"), train_tokenizer=300, **QUIET)


def test_corrupt_parquet_and_unknown_eos(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable parquet file"):
        prepare([str(tmp_path / "x.parquet")], str(tmp_path / "o"), **QUIET)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DataError, match="--eos '<nope>' is not a token of this tokenizer"):
        prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "o"), train_tokenizer=300, eos="<nope>", **QUIET)


# --- tokenizers -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory) -> str:
    """A BPE dataset: a 512-token byte-level BPE trained on ~400 KB of stdlib Python, sequences of 65."""
    out = tmp_path_factory.mktemp("bpe") / "ds"
    prepare([str(STDLIB / "json"), str(STDLIB / "email")], str(out), seq_len=65, val_fraction=0.1,
            include=["*.py"], train_tokenizer=512, **QUIET)
    return str(out)


def test_trained_tokenizer_is_saved_recorded_and_used(bpe_data):
    index = read_index(bpe_data)
    assert index.dtype == "uint16" and index.vocab_size == 512
    meta = index.tokenizer
    assert meta["path"] == "tokenizer.json" and meta["vocab_size"] == 512 and meta["source"] == "trained"
    tok = tokenizers.Tokenizer.from_file(str(Path(bpe_data, meta["path"])))
    assert tok.get_vocab_size() == 512 and tok.id_to_token(meta["eos_id"]) == "<|endoftext|>"
    for s in index.shards("train"):
        assert s.bytes == s.num_sequences * 65 * 2

    stream = train_tokens(bpe_data)
    assert stream.max() < 512 and (stream > 255).mean() > 0.3  # merges are really used
    source_bytes = sum(len(p.read_bytes()) for d in ("json", "email") for p in (STDLIB / d).rglob("*.py"))
    assert len(stream) + len(train_tokens(bpe_data, "val")) < 0.6 * source_bytes  # BPE compresses

    # The first train document decodes back to its file's text, and an EOS ends it.
    eos = meta["eos_id"]
    first_end = int(np.argmax(stream == eos))
    text = tok.decode(stream[:first_end].tolist())
    files = sorted((str(p.relative_to(STDLIB / d)), p) for d in ("json", "email") for p in (STDLIB / d).rglob("*.py"))
    assert any(p.read_text() == text for _, p in files)
    docs = sum(1 for rel, _ in files if not is_val(rel, 0.1))
    assert docs - 2 <= int((stream == eos).sum()) <= docs  # one per document (the last may be cut off)


def test_wide_tokens_through_dataset_sampler_loader_and_node_cache(bpe_data, tmp_path):
    import torch

    from dataloading.cache import ShardCache
    from dataloading.sampler import DistributedGlobalSampler, GlobalSampler

    ds = TokenDataset(bpe_data, "train", verify_local=True)
    index = ds.index
    raw = np.concatenate([np.fromfile(Path(bpe_data, s.name), dtype="<u2") for s in index.shards("train")])
    rows = raw.reshape(-1, 65)
    sampler = GlobalSampler(len(ds), 8, 3)
    for step in (0, 5, 300):
        for rank in (0, 1):
            ids = sampler.local_batch(step, rank, 2)
            assert np.array_equal(ds.batch(ids).numpy(), rows[ids])
    assert ds[10].dtype == np.uint16 and np.array_equal(ds[10], rows[10])

    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=DistributedGlobalSampler(len(ds), 8, 0, rank=1, world_size=2))
    batch = next(iter(loader))
    assert batch.shape == (4, 65) and int(batch.long().max()) > 255

    # The same dataset on a remote filesystem, read through the node cache.
    fs = fsspec.filesystem("memory")
    remote = f"bpe-{uuid.uuid4().hex}"
    try:
        fs.put(bpe_data, remote, recursive=True)
        rds = TokenDataset(f"memory://{remote}", "train", cache=ShardCache(tmp_path / "cache"))
        ids = sampler.local_batch(7, 0, 1)
        assert not rds.local and np.array_equal(rds.batch(ids).numpy(), rows[ids])
        rds.close()
    finally:
        fs.rm(remote, recursive=True)


def test_long_documents_are_encoded_in_pieces_and_decode_back(bpe_data, tmp_path, monkeypatch):
    import dataloading.tokenizer as tokenize

    calls = []
    encode_group = tokenize.Encoder._encode_group
    monkeypatch.setattr(tokenize, "PIECE_CHARS", 1000)
    monkeypatch.setattr(tokenize.Encoder, "_encode_group", lambda self, g, *a: calls.append(len(g)) or encode_group(self, g, *a))
    big = (STDLIB / "json" / "decoder.py").read_text() * 3
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.txt").write_text(big)  # the train split (by its name's hash)
    (tmp_path / "src" / "small.txt").write_text("x = 1\n" * 50)  # the val split
    assert not is_val("big.txt", 0.5) and is_val("small.txt", 0.5)
    out = str(tmp_path / "out")
    index = prepare([str(tmp_path / "src")], out, seq_len=65, val_fraction=0.5,
                    tokenizer=str(Path(bpe_data, "tokenizer.json")), **QUIET)
    assert sum(calls) > len(big) // 1000 and len(calls) > len(big) // 2000  # pieces of <= 1000 chars, ~2 a call
    assert index.tokenizer["source"] == str(Path(bpe_data, "tokenizer.json"))
    tok = tokenizers.Tokenizer.from_file(str(Path(out, "tokenizer.json")))
    text = tok.decode(train_tokens(out).tolist())  # the EOS is special: decode leaves it out
    assert big.startswith(text) and len(big) - len(text) < 200  # less than the dropped tail


def _word_tokenizer(path: Path, size: int, specials: list[str]) -> None:
    """A word-level tokenizer with `size` ids: w0 .. wN and the given specials at the top."""
    vocab = {f"w{i}": i for i in range(size - len(specials) - 1)}
    vocab["[UNK]"] = len(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_given_tokenizer_wider_than_16_bits_is_uint32(tmp_path):
    _word_tokenizer(tmp_path / "wide.json", 70_000, ["</s>", "<sep>"])
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % 69_990}" for j in range(20)) for i in range(60)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    index = prepare([str(tmp_path / "c.jsonl")], str(out), seq_len=9, val_fraction=0.2,
                    tokenizer=str(tmp_path / "wide.json"), **QUIET)
    assert index.dtype == "uint32" and index.vocab_size == 70_000
    eos = 69_998  # "</s>": the first of the known EOS names this tokenizer has
    assert index.tokenizer["eos_id"] == eos and index.tokenizer["source"] == str(tmp_path / "wide.json")
    assert (out / "tokenizer.json").read_bytes()  # the dataset carries its tokenizer

    want: dict[str, list[int]] = {"train": [], "val": []}
    for n, d in enumerate(docs, 1):
        want["val" if is_val(f"c.jsonl:{n}", 0.2) else "train"] += [int(w[1:]) for w in d.split()] + [eos]
    for split in ("train", "val"):
        got = train_tokens(str(out), split)
        assert got.tolist() == want[split][: len(got)] and len(want[split]) - len(got) < 9
    assert max(want["train"]) > 65_535 and train_tokens(str(out)).max() > 65_535

    # --eos picks another separator; a tokenizer without any known EOS joins documents directly.
    index = prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "o2"), seq_len=9, val_fraction=0.2,
                    tokenizer=str(tmp_path / "wide.json"), eos="<sep>", **QUIET)
    assert index.tokenizer["eos_id"] == 69_999 and 69_999 in train_tokens(str(tmp_path / "o2"))
    _word_tokenizer(tmp_path / "plain.json", 300, [])
    lines: list[str] = []
    index = prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "o3"), seq_len=9, val_fraction=0.2,
                    tokenizer=str(tmp_path / "plain.json"), log=lines.append)
    assert index.dtype == "uint16" and index.tokenizer["eos_id"] is None
    assert any("no EOS token" in x for x in lines)


def test_index_rejects_token_dtypes_it_cannot_read(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_corpus(src)
    prepare([str(src)], str(out), seq_len=33, val_fraction=0.2, **QUIET)
    doc = json.loads((out / "index.json").read_text())
    for dtype, vocab, msg in [("float32", 256, "token dtype 'float32' is not one of uint8, uint16, uint32"),
                              ("uint8", 512, "vocab_size 512 does not fit dtype uint8")]:
        (out / "index.json").write_text(json.dumps({**doc, "dtype": dtype, "vocab_size": vocab}))
        with pytest.raises(DataError, match=msg):
            TokenDataset(str(out), "train")


# --- training on it ---------------------------------------------------------------------------------


@pytest.mark.ray
def test_gpt_trains_on_a_bpe_dataset(tmp_path, home, bpe_data, ray_address):
    cfg = tiny_config(tmp_path, bpe_data, train={"max_steps": 10, "eval_every": 5, "eval_batches": 2})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = cli_json("runs", home=home)
    assert run["status"] == "completed"
    pts = cli_json("metrics", run["id"], "--key", "train/loss", "--rank", "0", home=home)["points"]
    assert [p["step"] for p in pts] == list(range(10))
    # A fresh model's loss is about ln(vocab): ln 512 = 6.24, where a 256-token head would give 5.55.
    assert 5.9 < pts[0]["value"] < 6.6, pts[0]
    assert pts[-1]["value"] < pts[0]["value"]
