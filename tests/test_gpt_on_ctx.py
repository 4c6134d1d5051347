"""The built-in GPT loop is a function on ctx (orchestrator/gpt_function.py), and run as a user's
function (`entrypoint.function`) it is the same training as without an entrypoint: the same
numbers at every step on every rank, bit for bit; a resume after SIGKILLs that an uninterrupted
run cannot tell from itself; one checkpoint layout, so either forks the other's checkpoints.
(Before the switch the same tests held it to the loop it replaced, and every test of the
built-in loop passed through it; bench/gpt_on_ctx.py still compares it with that loop.)"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import cli_json, run_cli, tiny_config
from tests.test_fault_tolerance import final_weights, launch_killed_twice, losses

GPT_FN = {"function": "orchestrator.gpt_function:train_gpt"}
KEYS = ("train/loss", "train/grad_norm", "train/lr", "eval/loss", "data/batch_fingerprint")


def series(home, run_id, key, rank):
    pts = cli_json("metrics", run_id, "--key", key, "--rank", str(rank), home=home)["points"]
    return [(p["step"], p["value"]) for p in pts]


def launch(cfg, home, address, *overrides) -> str:
    run_cli("launch", str(cfg), *overrides, "--address", address, home=home, check=True)
    return cli_json("runs", home=home)[-1]["id"]


def checkpoint_files(home, run_id) -> dict[int, list[str]]:
    """step -> the file names of each committed checkpoint (its layout)."""
    import fsspec

    from checkpointing.layout import step_dir

    report = cli_json("checkpoints", run_id, home=home)
    fs, root = fsspec.core.url_to_fs(report["uri"])
    return {c["step"]: sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root.rstrip('/')}/{step_dir(c['step'])}", detail=False))
            for c in report["checkpoints"] if c["status"] == "committed"}


@pytest.mark.ray
def test_the_function_sigkilled_twice_is_the_builtin_loop_bit_for_bit_and_each_forks_the_other(
        tmp_path, home, tiny_data, ray_address):
    """One reference and one chaos run serve three claims (each launch costs the suite a minute):
    the function, SIGKILLed twice, logs every series the uninterrupted built-in loop logs, bit for
    bit on both ranks; ends on the same weights; writes the same checkpoint layout; and each forks
    the other's checkpoint and continues exactly."""
    steps = 36
    released = tmp_path / "released"
    released.touch()  # unpaced for the reference and the forks; paced (numerics untouched) for the kills
    # dropout (each rank's RNG stream), warmup + cosine, clipping, accumulation, eval, checkpoints
    cfg = tiny_config(tmp_path, tiny_data,
                      model={"factory": "tests.user_models:slow_gpt",
                             "kwargs": {"pause_s": 0.05, "dropout": 0.1, "release_path": str(released)}},
                      optim={"lr": 0.005, "warmup_steps": 4, "grad_clip": 0.5},
                      train={"max_steps": steps, "eval_every": 8, "eval_batches": 2, "grad_accum_steps": 2},
                      checkpoint={"every_steps": 4, "keep_last": 10},  # all 9: the forks start at step 4
                      fault_tolerance={"max_restarts": 5, "backoff_s": 0.2})
    builtin = launch(cfg, home, ray_address)  # the built-in loop, never interrupted
    released.unlink()
    fn, code, out, err = launch_killed_twice(cfg, "entrypoint.function=" + GPT_FN["function"], home=home,
                                             address=ray_address, steps=steps, margin=6, seed=5)
    released.touch()
    assert code == 0, out + err
    assert out.count("RESTART") == 2 and "recovered" in out
    assert cli_json("show", fn, home=home)["config"]["entrypoint"]["function"] == GPT_FN["function"]
    for rank in (0, 1):
        for key in KEYS:
            if key in ("eval/loss", "data/batch_fingerprint") and rank == 1:
                continue  # rank 0 logs those
            want = series(home, builtin, key, rank)
            assert want, (key, rank)
            if key != "eval/loss":
                assert [s for s, _ in want] == list(range(steps)), (key, rank)
            assert series(home, fn, key, rank) == want, (key, rank)  # bit for bit, kills and all
    ref_step, ref_model = final_weights(home, builtin)
    got_step, got_model = final_weights(home, fn)
    assert ref_step == got_step == steps and ref_model and ref_model.keys() == got_model.keys()
    assert all(torch.equal(ref_model[k], got_model[k]) for k in ref_model)
    layouts, got = checkpoint_files(home, builtin), checkpoint_files(home, fn)
    assert sorted(layouts) == list(range(4, steps + 1, 4)) and steps in got
    assert all(got[s] == layouts[s] for s in got)  # one layout

    # the function picks up the built-in loop's checkpoint of step 4, and the other way round
    for parent, override, name in ((builtin, "entrypoint.function=" + GPT_FN["function"], "fn-child"),
                                   (fn, "entrypoint.function=null", "builtin-child")):
        proc = run_cli("fork", parent, "--step", "4", override, "--name", name, "--address", ray_address, home=home)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        child = next(r for r in cli_json("runs", home=home) if r["name"] == name)
        kind = cli_json("show", child["id"], home=home)["config"]["entrypoint"]["function"]
        assert kind == (GPT_FN["function"] if name == "fn-child" else None)
        for rank in (0, 1):
            assert losses(home, child["id"], rank=rank) == losses(home, builtin, rank=rank)  # steps 4..35 exactly


# --- ctx's additions, without Ray -----------------------------------------------------------


def bare_ctx(tmp_path, **sections):
    """A TrainContext on one rank with no checkpointer: what ctx checks before any service."""
    from types import SimpleNamespace

    from orchestrator.config import config_from_dict
    from orchestrator.context import TrainContext
    from orchestrator.hang.health import Health

    sender = SimpleNamespace(log=lambda values, step: None, flush=lambda: None)
    member = SimpleNamespace(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    services = SimpleNamespace(member=member, sender=sender, health=Health(0), checkpointer=None, loaded=None,
                               snapshots=None)
    cfg = config_from_dict({"data": {"uri": str(tmp_path), "global_batch_size": 4}, **sections})
    return TrainContext(cfg, services, skipped=(2,))


def test_the_loader_passes_over_skipped_batches_and_names_the_one_it_yielded(tmp_path):
    from common.errors import NonFiniteLoss

    ctx = bare_ctx(tmp_path)
    data = torch.arange(40).reshape(20, 2).float()
    loader = ctx.data_loader(torch.utils.data.TensorDataset(data), 4)
    seen = []
    for _ in loader:
        seen.append((loader.index, loader.position))
    # batch 2 (rolled back after a non-finite loss) is never yielded; the position saved after
    # batch 1 is already the next batch trained on, 3
    assert seen == [(0, 1), (1, 3), (3, 4), (4, 5)]
    with pytest.raises(NonFiniteLoss, match="at step 4"):
        ctx.check_loss(float("nan"), loader)
    ctx.check_loss(1.5, loader)  # finite: nothing


def test_ctx_additions_refuse_bad_input_in_one_line(tmp_path):
    from common.errors import UserError
    from dataloading.sampler import GlobalSampler

    ctx = bare_ctx(tmp_path)
    data = torch.utils.data.TensorDataset(torch.zeros(20, 2))
    with pytest.raises(UserError, match=r"the sampler covers 20 samples in global batches of 8; expected 20 .* 4 x 1"):
        ctx.data_loader(data, 4, sampler=GlobalSampler(20, 8, seed=0))
    with pytest.raises(UserError, match="sampler= must be a dataloading.sampler.GlobalSampler"):
        ctx.data_loader(data, 4, sampler=[0, 1, 2])
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match=r"a module or optimizer itself \(here at 'model'\) goes only in"):
        ctx.save({"model": model, "optimizer": opt, "step": 3}, 0)
    with pytest.raises(UserError, match="keeps one ctx.data_loader's position, and there are 0"):
        ctx.save({"model": model, "optimizer": opt}, 0)
