"""`orchestrator import tensorboard` (event files written by tensorboardX) and `orchestrator export`
(read back and compared point for point with the store)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from orchestrator.export import SCHEMA, export_run
from orchestrator.logged_points import PointWriter, wall_times
from orchestrator.store import Store
from orchestrator.store_cli import cmd_copy
from orchestrator.tb_import import import_tensorboard
from orchestrator.tensorboard import crc32c, masked_crc, masked_crc_many
from tests.conftest import cli_json, run_cli

tbx = pytest.importorskip("tensorboardX")
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata  # noqa: E402
from tensorboardX.proto.tensor_pb2 import TensorProto  # noqa: E402
from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto  # noqa: E402

T0 = 1_700_000_000.0
STEPS = 60


def tensor_summary(tag: str, value: float, *, first: bool, double: bool) -> Summary:
    """A TensorFlow 2 style scalar: a 0-d tensor, the "scalars" plugin named on a tag's first value only."""
    if double:
        tensor = TensorProto(dtype=2, tensor_content=struct.pack("<d", value), tensor_shape=TensorShapeProto())
    else:
        tensor = TensorProto(dtype=1, float_val=[value], tensor_shape=TensorShapeProto())
    value_ = Summary.Value(tag=tag, tensor=tensor)
    if first:
        value_.metadata.CopyFrom(SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars")))
    return Summary(value=[value_])


def write_logs(root: Path) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """train/ (legacy and tensor scalars, a histogram) and eval/; returns what was written, by folder and tag."""
    written: dict[str, dict[str, list]] = {"train": {}, "eval": {}}
    w = tbx.SummaryWriter(str(root / "train"))
    fw = w._get_file_writer()
    for s in range(STEPS):
        loss = 5.0 if s == 41 else 1.0 / (s + 1)  # one spike
        w.add_scalar("loss", loss, s, walltime=T0 + s)
        fw.add_summary(tensor_summary("v2/lr", 0.1 * 0.9**s, first=s == 0, double=False), s, T0 + s + 0.25)
        fw.add_summary(tensor_summary("v2/exact", 1.0 / 3 + s, first=s == 0, double=True), s, T0 + s + 0.5)
        written["train"].setdefault("loss", []).append((s, float(np.float32(loss)), T0 + s))
        written["train"].setdefault("v2/lr", []).append((s, float(np.float32(0.1 * 0.9**s)), T0 + s + 0.25))
        written["train"].setdefault("v2/exact", []).append((s, 1.0 / 3 + s, T0 + s + 0.5))
    w.add_histogram("weights", np.arange(10.0), 0)
    w.close()
    w = tbx.SummaryWriter(str(root / "eval"))
    for s in (10, 20):
        w.add_scalar("acc", s / 100, s, walltime=T0 + 100 + s)
        written["eval"].setdefault("acc", []).append((s, float(np.float32(s / 100)), T0 + 100 + s))
    w.close()
    return written


def record_offsets(path: Path) -> list[int]:
    """Where each TFRecord starts, from the length fields alone."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        out.append(pos)
        pos += 16 + struct.unpack("<Q", data[pos:pos + 8])[0]
    return out


def test_crc32c_known_values():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    datas = [bytes([i % 251]) * (i % 7 + 1) + b"x" * (i % 3) for i in range(200)] + [b"", b"123456789"]
    assert masked_crc_many(datas).tolist() == [masked_crc(d) for d in datas]


def test_import_keeps_steps_values_and_wall_times(tmp_path, home):
    written = write_logs(tmp_path / "logs")
    store = Store(home)
    made = import_tensorboard(store, str(tmp_path / "logs"), name="exp1", out=lambda *_: None, warn=pytest.fail)
    assert sorted(r["name"] for r in made) == ["exp1/eval", "exp1/train"]
    for r in made:
        folder = r["name"].split("/")[1]
        assert store.run(r["id"])["status"] == "completed"
        assert sorted(store.metric_keys(r["id"])) == sorted(written[folder])
        for key, rows in written[folder].items():
            got = store.series(r["id"], key, rank=0)
            assert len(got) == len(rows) > 0
            assert [(p["step"], p["value"]) for p in got] == [(s, v) for s, v, _ in rows]
            walls = wall_times(store, r["id"], key, 0, 0, np.array([s for s, _, _ in rows]))
            assert walls.tolist() == [w for _, _, w in rows]
    train = next(r for r in made if r["name"] == "exp1/train")
    assert train["skipped"] == 1  # the histogram
    assert max(b["max"] for b in store.buckets(train["id"], "loss", 6)) == pytest.approx(5.0)  # the spike kept
    store.close()


def test_store_copy_carries_wall_times(tmp_path, home):
    """`store copy` moves an imported run with the wall times kept beside its points."""
    written = write_logs(tmp_path / "logs")
    src = Store(home)
    made = import_tensorboard(src, str(tmp_path / "logs"), name="exp1", out=lambda *_: None, warn=pytest.fail)
    train = next(r for r in made if r["name"] == "exp1/train")
    src.close()
    dst_dir = tmp_path / "copy"
    assert cmd_copy(str(home), str(dst_dir), [train["id"]], out=lambda *_: None) == 0
    dst = Store(dst_dir, create=False)
    rows = written["train"]["loss"]
    steps = np.array([s for s, _, _ in rows])
    assert len(rows) > 0
    assert [p["value"] for p in dst.series(train["id"], "loss", rank=0)] == [v for _, v, _ in rows]
    assert wall_times(dst, train["id"], "loss", 0, 0, steps).tolist() == [w for _, _, w in rows]
    dst.close()


def test_a_replayed_step_keeps_every_value(tmp_path, home):
    logs = tmp_path / "logs"
    for first, steps in ((0, range(10)), (1, range(5, 12))):  # a writer restarted from step 5
        w = tbx.SummaryWriter(str(logs), filename_suffix=f".{first}")
        for s in steps:
            w.add_scalar("loss", float(s + 100 * first), s, walltime=T0 + 100 * first + s)
        w.close()
    files = sorted(logs.iterdir())
    assert len(files) == 2
    store = Store(home)
    (made,) = import_tensorboard(store, str(logs), out=lambda *_: None, warn=pytest.fail)
    assert made["points"] == 17
    latest = {p["step"]: p["value"] for p in store.series(made["id"], "loss", rank=0)}
    assert latest == {s: float(s + (100 if s >= 5 else 0)) for s in range(12)}
    store.close()


def test_corrupt_and_truncated_files(tmp_path, home):
    logs = tmp_path / "logs"
    w = tbx.SummaryWriter(str(logs))
    for s in range(20):
        w.add_scalar("loss", float(s), s)
    w.close()
    (path,) = [p for p in logs.iterdir()]
    offsets = record_offsets(path)
    assert len(offsets) == 21  # the file_version event, then one per scalar
    data = bytearray(path.read_bytes())
    data[offsets[5] + 14] ^= 0xFF  # inside record 5's data: its CRC fails, the framing holds
    path.write_bytes(bytes(data[:offsets[15] + 7]))  # and cut inside record 15's header
    proc = run_cli("import", "tensorboard", str(logs), home=home)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert str(path) in lines[0] and f"byte offset {offsets[5]}" in lines[0] and "CRC" in lines[0]
    assert str(path) in lines[1] and f"byte offset {offsets[15]}" in lines[1] and "truncated" in lines[1]
    (run,) = cli_json("runs", home=home)
    points = cli_json("metrics", run["id"], "--key", "loss", home=home)["points"]
    assert [p["step"] for p in points] == [s for s in range(14) if s != 4]  # record k holds step k - 1

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "events.out.tfevents.1.host").write_bytes(b"\x00" * 5 + b"not an event file" * 3)
    proc = run_cli("import", "tensorboard", str(garbage), home=home)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "nothing could be read" in proc.stderr
    assert "events.out.tfevents.1.host" in proc.stderr and "byte offset 0" in proc.stderr
    proc = run_cli("import", "tensorboard", str(tmp_path / "absent"), home=home)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr


def stored_points(store: Store, run_id: str) -> list[tuple]:
    rows = []
    for key in store.points.keys(run_id):
        for sid, rank, attempt, _ in store.points.find(run_id, key):
            p = store.points.read(sid)
            walls = wall_times(store, run_id, key, rank, attempt, p.steps)
            rows += [(run_id, key, rank, attempt, int(s), float(v), None if math.isnan(w) else float(w))
                     for s, v, w in zip(p.steps, p.values, walls, strict=True)]
    return rows


def same(a: list[tuple], b: list[tuple]) -> bool:
    """Row for row equal, NaN equal to NaN."""
    def norm(row):
        return tuple("nan" if isinstance(x, float) and math.isnan(x) else x for x in row)
    return [norm(r) for r in a] == [norm(r) for r in b]


@pytest.fixture
def filled(home):
    """A launched-like run (2 ranks, a restart replaying steps, a NaN) and an MLflow-like one with wall times."""
    store = Store(home)
    store.create_run(run_id="launched", name="gpt", config={}, git_commit=None, host="h", command="c", world_size=2)
    store.log_metrics("launched", [("train/loss", s, r, 3.0 - 0.01 * s + r, 0.0) for s in range(50) for r in (0, 1)])
    store.log_metrics("launched", [("train/loss", s, 0, -1.0 * s, 0.0) for s in range(40, 60)], attempt=1)
    store.log_metrics("launched", [("eval/loss", 10, 0, float("nan"), 0.0), ("eval/loss", 20, 0, 1.5, 0.0)])
    store.create_run(run_id="logged", name="m", config={}, git_commit=None, host="h", command="c", world_size=1,
                     meta={"source": "mlflow"})
    PointWriter(store).write("logged", [("acc", s % 7, s / 10, T0 + s * 0.001) for s in range(30)])
    yield store
    store.close()


def test_export_round_trip(filled, tmp_path):
    for run_id in ("launched", "logged"):
        expected = stored_points(filled, run_id)
        assert len(expected) > 20
        for fmt in ("parquet", "csv"):
            out = tmp_path / f"{run_id}.{fmt}"
            result = export_run(filled, run_id, fmt=fmt, out=str(out))
            assert result["points"] == len(expected)
            if fmt == "parquet":
                table = pq.read_table(out)
            else:
                table = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(
                    column_types={f.name: f.type for f in SCHEMA}, null_values=[""]))
            assert table.schema.names == SCHEMA.names
            got = list(zip(*[table.column(n).to_pylist() for n in SCHEMA.names], strict=True))
            assert same(got, expected), fmt
    # attempts kept: the replayed steps are in the file twice, and repeated MLflow steps too
    got = pq.read_table(tmp_path / "logged.parquet").to_pydict()
    assert sorted(set(got["attempt"])) == [0, 1, 2, 3, 4] and all(w is not None for w in got["wall_time"])


def test_export_cli(filled, tmp_path, home):
    dest = tmp_path / "loss.parquet"
    proc = run_cli("export", "launched", "--format", "parquet", "--key", "train/loss", "--out", str(dest), home=home)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(dest)
    assert table.num_rows == 120 and set(table.column("key").to_pylist()) == {"train/loss"}
    assert "exported 120 points" in proc.stdout
    proc = run_cli("export", "launched", "--format", "parquet", "--out", str(dest), home=home)
    assert proc.returncode == 2 and "exists" in proc.stderr and "--force" in proc.stderr
    assert pq.read_table(dest).num_rows == 120  # untouched
    proc = run_cli("export", "launched", "--format", "csv", "--out", "-", "--key", "eval/loss", home=home)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == '"run","key","rank","attempt","step","value","wall_time"'
    assert len(proc.stdout.splitlines()) == 3 and "nan" in proc.stdout
    for args, words in ((["nope"], "no run"), (["launched", "--key", "train/los"], "did you mean train/loss"),
                        (["launched", "--format", "parquet", "--out", "-"], "standard output")):
        argv = ["export", *args] if "--format" in args else ["export", *args, "--format", "csv", "--out",
                                                              str(tmp_path / "x.csv")]
        proc = run_cli(*argv, home=home)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.glob(".*part"))  # no half-written files left behind


def test_export_writes_nothing_on_a_failure(filled, tmp_path, monkeypatch):
    import orchestrator.export as export

    def broken(*args, **kwargs):
        yield pa.table({n: pa.array([], f.type) for n, f in zip(SCHEMA.names, SCHEMA, strict=True)}, schema=SCHEMA)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "tables", broken)
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / "loss.parquet"
    with pytest.raises(Exception, match="No space left"):
        export_run(filled, "launched", fmt="parquet", out=str(dest))
    assert not list((tmp_path / "out").iterdir())  # neither the file nor a part of it


def test_tensor_scalars_of_every_dtype():
    from orchestrator.tensorboard import _tensor_scalar

    shape = TensorShapeProto()
    cases = [
        (TensorProto(dtype=1, float_val=[0.5], tensor_shape=shape), 0.5),
        (TensorProto(dtype=2, double_val=[1 / 3], tensor_shape=shape), 1 / 3),
        (TensorProto(dtype=19, half_val=[int(np.array([1.5], "<f2").view("<u2")[0])], tensor_shape=shape), 1.5),
        (TensorProto(dtype=14, half_val=[0x3FC0], tensor_shape=shape), 1.5),  # bfloat16 bits of 1.5
        (TensorProto(dtype=3, int_val=[-7], tensor_shape=shape), -7.0),
        (TensorProto(dtype=9, int64_val=[2**40], tensor_shape=shape), float(2**40)),
        (TensorProto(dtype=1, tensor_content=np.array([2.25], "<f4").tobytes(), tensor_shape=shape), 2.25),
        (TensorProto(dtype=19, tensor_content=np.array([-0.5], "<f2").tobytes(), tensor_shape=shape), -0.5),
    ]
    for proto, want in cases:
        assert _tensor_scalar(proto.SerializeToString()) == want, proto
    two = TensorProto(dtype=1, float_val=[1.0, 2.0], tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=2)]))
    assert _tensor_scalar(two.SerializeToString()) is None  # a vector is not a scalar
    strings = TensorProto(dtype=7, string_val=[b"x"], tensor_shape=shape)
    assert _tensor_scalar(strings.SerializeToString()) is None
