"""A user's own training function (entrypoint.function) on a real local Ray cluster: every
service reaches it through ctx, and a run SIGKILLed twice ends bit-identical to one that never was."""

from __future__ import annotations

import pytest

from tests.conftest import cli_json, run_cli, tiny_config
from tests.test_fault_tolerance import launch_killed_twice, losses

pytestmark = pytest.mark.ray

FN = "tests.user_functions:regression"


def function_config(tmp_path, tiny_data, steps=40, **kwargs):
    return tiny_config(tmp_path, tiny_data, train={"max_steps": steps}, checkpoint={"every_steps": 5},
                       fault_tolerance={"max_restarts": 5, "backoff_s": 0.2},
                       entrypoint={"function": FN, "kwargs": kwargs})


def test_a_function_trains_logs_checkpoints_and_sigkilled_twice_ends_bit_identical(tmp_path, home, tiny_data,
                                                                                     ray_address):
    steps = 40
    cfg = function_config(tmp_path, tiny_data, steps=steps, lr=0.02, pause_s=0.1)
    run_cli("launch", str(cfg), "--address", ray_address, home=home, check=True, timeout=600)
    reference = cli_json("runs", home=home)[-1]["id"]
    # the uninterrupted run: it trains, logs and checkpoints through ctx
    for rank in (0, 1):
        pts = losses(home, reference, rank=rank)
        assert [s for s, _ in pts] == list(range(steps))
        first, last = [v for _, v in pts[:5]], [v for _, v in pts[-10:]]
        assert sum(last) / len(last) < sum(first) / len(first)  # it learns
    firsts = [cli_json("metrics", reference, "--key", "data/first_x", "--rank", str(r), home=home)["points"][0]["value"]
              for r in (0, 1)]
    assert firsts[0] != firsts[1]  # each rank gets its own slice of the global batch
    saved = [c["step"] for c in cli_json("checkpoints", reference, home=home)["checkpoints"] if c["status"] == "committed"]
    assert saved and saved[-1] == steps and all(s % 5 == 0 for s in saved)

    chaos, code, out, err = launch_killed_twice(cfg, home=home, address=ray_address, steps=steps, margin=7, seed=11)
    assert code == 0, out + err
    assert out.count("RESTART") == 2
    ref0, got0 = losses(home, reference), losses(home, chaos)
    assert len(ref0) == steps and got0 == ref0  # every step's loss, bit for bit
    assert losses(home, chaos, rank=1) == losses(home, reference, rank=1)


def test_an_exception_in_user_code_names_the_rank_and_the_users_frame(tmp_path, home, tiny_data, ray_address):
    cfg = function_config(tmp_path, tiny_data, steps=20, fail_at=3)
    cfg_text = cfg.read_text().replace("max_restarts: 5", "max_restarts: 0")
    cfg.write_text(cfg_text)
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=600)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "rank" in last and "ValueError: bad batch at step 3" in last and "user_functions.py" in last, last
    assert proc.stderr.count("Traceback (the user's frames)") == 1
    assert "tests/user_functions.py" in proc.stderr and "orchestrator/rank.py" not in proc.stderr


@pytest.mark.parametrize("entry, expected", [
    ({"function": "tests.user_functions:no_ctx"}, "expected a function taking ctx"),
    ({"function": "tests.no_such_module:fn"}, "cannot import tests.no_such_module"),
    ({"function": "tests.user_functions:regression", "script": "train.py"}, "both script="),
    ({"script": "no_such_script.py"}, "entrypoint.script: no such file"),
])
def test_bad_entrypoints_are_one_line_before_any_worker(tmp_path, home, tiny_data, entry, expected):
    cfg = tiny_config(tmp_path, tiny_data, entrypoint=entry)
    proc = run_cli("launch", str(cfg), home=home, timeout=120)  # no --address: it must fail before Ray starts
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr


def test_saving_something_that_is_not_a_state_dict_is_one_line(tmp_path, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data, entrypoint={"function": "tests.user_functions:saves_a_list"})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=600)
    assert proc.returncode in (1, 2)
    last = proc.stderr.strip().splitlines()[-1]
    assert "ctx.save: expected a state dict" in last and "rank" in last, proc.stderr
    assert "RESTART" not in proc.stdout  # bad input: restarting cannot help


def test_keyword_only_settings_from_entrypoint_kwargs_are_accepted_and_checked():
    from common.errors import ConfigError
    from orchestrator.entrypoints import load_function

    assert load_function("tests.user_functions:keyword_only", None, {"lr": 0.1})(None, lr=0.1) == 0.1
    with pytest.raises(ConfigError, match=r"entrypoint.kwargs \[\] .*missing a required argument: 'lr'"):
        load_function("tests.user_functions:keyword_only", None, {})
    with pytest.raises(ConfigError, match=r"entrypoint.kwargs \['lr', 'momentum'\]"):
        load_function("tests.user_functions:keyword_only", None, {"lr": 0.1, "momentum": 0.9})


def test_overrides_after_script_are_overrides_not_a_config_file(tmp_path, home):
    proc = run_cli("launch", "--script", str(tmp_path / "missing.py"), "--workers", "2", "cluster.dashboard=false",
                   home=home, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "entrypoint.script: no such file" in lines[0], proc.stderr
