"""A snapshot's wire form (checkpointing/flat.py): tensors of every dtype and shape come back bit
for bit in their places, the reused buffer holds only the newest pack, and a damaged header is
refused with a clear error; and the writers' background thread (checkpointing/background.py)."""

from __future__ import annotations

import pytest
import torch

from checkpointing import flat


def state():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, generator=g)
    return {
        "model": {"w": w, "w_t": w.t(), "half": torch.randn(5, generator=g).to(torch.bfloat16),
                  "mask": torch.rand(7, generator=g) > 0.5, "ids": torch.arange(3, dtype=torch.int64)},
        "optim": {"state": {0: {"step": torch.tensor(12.0), "exp_avg": torch.randn(6, 4, generator=g)}},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]},
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(7, dtype=torch.int8),
        "text": "plain values stay as they are",
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16 else a,
                                b.view(torch.uint8) if b.dtype == torch.bfloat16 else b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def round_trip(packer, obj):
    skeleton, table, data = packer.pack(obj)
    header, buffer = flat.from_wire(flat.to_wire({"state": skeleton, "table": table}, data))
    return flat.unpack(header["state"], header["table"], buffer), data


def test_every_dtype_and_shape_comes_back_bit_exact():
    original = state()
    back, data = round_trip(flat.Packer(), original)
    assert data.numel() >= sum(t.nbytes for t in original["model"].values())  # something was packed
    assert same(original, back)
    assert back["optim"]["param_groups"][0]["betas"] == (0.9, 0.95)  # a tuple stays a tuple
    assert back["model"]["w_t"].shape == (4, 6)  # a transposed view packs as its values


def test_the_buffer_is_reused_and_holds_the_newest_pack():
    packer = flat.Packer()
    packer.pack(state())
    buffer = packer.buffer
    assert buffer is not None and buffer.numel() > 0
    changed = state()
    changed["model"]["w"].add_(1.0)
    back, _ = round_trip(packer, changed)
    assert packer.buffer is buffer  # the same memory: no fresh pages per snapshot
    assert same(changed, back) and not same(state()["model"]["w"], back["model"]["w"])
    bigger = {"w": torch.zeros(buffer.numel())}  # 4 bytes per element: outgrows the buffer
    back, _ = round_trip(packer, bigger)
    assert packer.buffer.numel() >= 4 * buffer.numel() and same(bigger, back)


def test_a_damaged_table_is_refused():
    skeleton, table, data = flat.Packer().pack(state())
    buffer = data.clone()
    start, _, shape = table[0]
    with pytest.raises(ValueError, match="unknown dtype 'os.system'"):
        flat.unpack(skeleton, [(start, "os.system", shape)] + table[1:], buffer)
    with pytest.raises(ValueError, match="past its buffer"):
        flat.unpack(skeleton, [(buffer.numel(), table[0][1], [4])] + table[1:], buffer)
    with pytest.raises(ValueError, match=r"a snapshot is \[header, buffer\]"):
        flat.from_wire(b"not parts")


def test_background_runs_jobs_in_order_and_survives_a_failing_one(capsys):
    import threading

    from checkpointing.background import Background

    ran, gate = [], threading.Event()
    bg = Background("test-writer")
    bg.submit(lambda: (gate.wait(30), ran.append(1)))
    assert bg.busy  # the first job waits for the gate
    bg.submit(lambda: 1 / 0)  # a job that raises: its traceback is printed, the thread goes on
    bg.submit(ran.append, 3)
    gate.set()
    bg.wait()
    assert ran == [1, 3] and not bg.busy
    thread = bg.thread
    bg.submit(ran.append, 4)
    bg.close()
    assert ran == [1, 3, 4] and thread is not None and not thread.is_alive() and bg.thread is None
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_an_idle_background_thread_ends_and_a_new_job_starts_another():
    import time

    from checkpointing.background import Background

    ran = []
    bg = Background("test-idle", idle_exit_s=0.05)
    bg.submit(ran.append, 1)
    bg.wait()
    first = bg.thread
    deadline = time.monotonic() + 30
    while bg.thread is not None and time.monotonic() < deadline:  # ends on its own once idle
        time.sleep(0.01)
    assert bg.thread is None and first is not None
    first.join(timeout=30)
    assert not first.is_alive()
    bg.submit(ran.append, 2)
    bg.close()
    assert ran == [1, 2]
