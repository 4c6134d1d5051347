"""`orchestrator validate`: every pre-training check of `launch`, without training; ok lines and
exit 0, or one line per problem and exit 2. Ray only for the cluster check."""

from __future__ import annotations

import os
import socket

import pytest

from common.errors import UserError
from orchestrator import cli
from orchestrator.config import load_config
from orchestrator.validate import preflight, run_checks
from tests.conftest import run_cli, tiny_config


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def validate(capsys, *argv) -> tuple[int, list[str], list[str]]:
    code = cli.main(["validate", *argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_a_good_config_passes_every_check_and_skips_the_cluster(tmp_path, home, tiny_data, capsys):
    cfg = tiny_config(tmp_path, tiny_data, checkpoint={"uri": str(tmp_path / "ckpt" / "new")},
                      telemetry={"alert_webhook": "https://hooks.example/T/B/X", "prometheus_port": 0})
    code, out, err = validate(capsys, str(cfg), "train.max_steps=5")
    assert code == 0 and err == []
    assert out[0] == f"ok: config {cfg} with 1 override(s)"
    assert any(line.startswith("ok: data.uri ") and "train sequences" in line for line in out)
    assert "ok: model: built-in GPT, 2 layers, 2 heads, d_model 64" in out
    assert any(line.startswith("ok: checkpoint.uri=") and "writable" in line for line in out)
    assert any(line.startswith("ok: telemetry.prometheus_port: 0") for line in out)
    assert "ok: telemetry.alert_webhook: an https URL on hooks.example (not called)" in out
    assert out[-1].startswith("skipped: cluster resources: no --address and no RAY_ADDRESS")
    assert not (tmp_path / "ckpt").exists()  # the marker and the directories made for it are gone
    assert not home.exists()  # validating creates no store


def test_every_problem_is_one_line_and_exit_2(tmp_path, home, tiny_data, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        cfg = tiny_config(tmp_path, str(tmp_path / "no-data"), model={"factory": "no_such_module_xyz:build"},
                          checkpoint={"uri": str(blocker / "ckpt")},
                          telemetry={"prometheus_port": busy.getsockname()[1]})
        code, out, err = validate(capsys, str(cfg))
    assert code == 2 and len(err) == 4, err
    assert err[0].startswith("error: ") and "no dataset index here" in err[0]
    assert "model.factory='no_such_module_xyz:build': cannot import no_such_module_xyz" in err[1]
    assert "checkpoint.uri=" in err[2] and "cannot write there" in err[2]
    assert "telemetry.prometheus_port=" in err[3] and "cannot listen on 127.0.0.1" in err[3]
    assert "ok: telemetry.alert_webhook: null, alerts are stored only" in out
    assert not any("Traceback" in line for line in err)


def test_too_few_sequences_for_one_global_batch(tmp_path, home, tiny_data, capsys):
    cfg = tiny_config(tmp_path, tiny_data)
    code, out, err = validate(capsys, str(cfg), "data.global_batch_size=1000000", "scaling.num_workers=1")
    assert code == 2 and len(err) == 1 and "fewer than one global batch" in err[0]


def test_a_config_problem_is_the_one_line(tmp_path, home, tiny_data, capsys):
    cfg = tiny_config(tmp_path, tiny_data)
    code, out, err = validate(capsys, str(cfg), "telemetry.alert_webhook=ftp://x/y")
    assert code == 2 and out == [] and len(err) == 1
    assert "telemetry.alert_webhook='ftp://x/y': expected an http:// or https:// URL with a host" in err[0]


def test_default_checkpoint_location_is_checked_without_creating_anything(tmp_path, home, tiny_data):
    cfg = load_config(tiny_config(tmp_path, tiny_data))
    [ckpt] = [c for c in run_checks(cfg) if "checkpoint" in c.message]
    assert ckpt.status == "ok" and str(home / "checkpoints") in ckpt.message
    assert not home.exists()


def test_preflight_raises_the_first_problem_like_launch(tmp_path, home):
    cfg = load_config(tiny_config(tmp_path, ""))
    with pytest.raises(UserError, match="data.uri: required; point it at a dataset made by `orchestrator data prepare`"):
        preflight(cfg)


def test_cluster_resources_are_compared_when_an_address_is_given(tmp_path, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data)
    ok = run_cli("validate", str(cfg), "--address", ray_address, home=home)
    assert ok.returncode == 0, ok.stderr
    [line] = [x for x in ok.stdout.splitlines() if "cluster at" in x]
    assert line.startswith("ok: cluster at ") and "scaling.num_workers=2 x {CPU: 1} = {CPU: 2}" in line
    too_big = run_cli("validate", str(cfg), "scaling.num_workers=64", "data.global_batch_size=64",
                      "--address", ray_address, home=home)
    assert too_big.returncode == 2
    [problem] = too_big.stderr.strip().splitlines()
    assert problem.startswith("error: cluster at ") and "= {CPU: 64}, but it has" in problem


def test_a_cluster_with_token_authentication_is_reached_without_ray_auth_mode(tmp_path, home, tiny_data,
                                                                             ray_address, monkeypatch):
    """Ray >= 2.59 clusters want a token, and Ray sends it only under RAY_AUTH_MODE=token, which a
    user's shell rarely sets: the CLI turns it on when a token is at hand (~/.ray/auth_token)."""
    import os

    if os.environ.get("RAY_AUTH_MODE") != "token":
        pytest.skip("this Ray's local clusters do not use token authentication")
    monkeypatch.delenv("RAY_AUTH_MODE")
    ok = run_cli("validate", str(tiny_config(tmp_path, tiny_data)), "--address", ray_address, home=home, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert any(x.startswith("ok: cluster at ") for x in ok.stdout.splitlines()), ok.stdout


def fake_gcs(refuse: bool):
    """A gRPC server answering the GCS call cluster.wants_token makes: as a cluster without token
    authentication does, or refusing it as one with it does (UNAUTHENTICATED)."""
    from concurrent import futures

    import grpc

    def get_cluster_id(request, context):
        if refuse:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "token required")
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "ray.rpc.NodeInfoGcsService", {"GetClusterId": grpc.unary_unary_rpc_method_handler(get_cluster_id)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_the_token_is_used_when_the_cluster_asks_and_one_is_at_hand_and_an_explicit_mode_is_kept(tmp_path,
                                                                                                   monkeypatch):
    from orchestrator import cluster

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    open_gcs, open_address = fake_gcs(refuse=False)
    closed_gcs, closed_address = fake_gcs(refuse=True)
    try:
        assert cluster.use_token() is False and "RAY_AUTH_MODE" not in os.environ  # no token anywhere
        assert cluster.use_token(closed_address) is False and "RAY_AUTH_MODE" not in os.environ
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("t" * 64)
        # a cluster without authentication: token mode off, also for Ray, which turns it on when a token exists
        assert cluster.use_token(open_address) is False and os.environ["RAY_AUTH_MODE"] == "disabled"
        monkeypatch.delenv("RAY_AUTH_MODE")
        assert cluster.use_token(closed_address) is True and os.environ["RAY_AUTH_MODE"] == "token"
        monkeypatch.delenv("RAY_AUTH_MODE")
        assert cluster.use_token() is True and os.environ["RAY_AUTH_MODE"] == "token"  # an embedded cluster
        monkeypatch.delenv("RAY_AUTH_MODE")
        with socket.socket() as s:  # nothing answers there: token mode, as for an embedded cluster
            s.bind(("127.0.0.1", 0))
            assert cluster.use_token(f"127.0.0.1:{s.getsockname()[1]}") is True
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's own choice stands
        assert cluster.use_token(closed_address) is False and os.environ["RAY_AUTH_MODE"] == "disabled"
    finally:
        open_gcs.stop(None)
        closed_gcs.stop(None)


@pytest.mark.ray
def test_a_real_cluster_says_whether_it_wants_a_token(ray_address):
    from orchestrator import cluster

    assert cluster.wants_token(ray_address) is (os.environ.get("RAY_AUTH_MODE") == "token")


@pytest.mark.ray
def test_a_run_on_a_cluster_without_authentication_works_though_a_token_is_at_hand(tmp_path, home, tiny_data):
    """With RAY_AUTH_MODE=token a driver's actors on such a cluster die at once (it cannot call the
    driver back): the CLI asks the cluster first and sends no token to one that wants none."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import free_port

    temp = Path("/tmp") / f"orch-noauth-{os.getpid()}"
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).parent / "ray")
    try:
        started = subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                  "--num-cpus", "1", "--include-dashboard", "false", "--temp-dir", str(temp),
                                  "--disable-usage-stats", "--ray-client-server-port", str(free_port())],
                                 env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        assert os.environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file()  # at hand
        cfg = tiny_config(tmp_path, tiny_data, scaling={"num_workers": 1}, train={"max_steps": 2, "eval_every": 0})
        saved = os.environ.pop("RAY_AUTH_MODE", None)  # the user's shell sets no mode
        try:
            proc = run_cli("launch", str(cfg), "--address", f"127.0.0.1:{port}", home=home)
        finally:
            if saved is not None:
                os.environ["RAY_AUTH_MODE"] = saved
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "completed: 2 steps" in proc.stdout, proc.stdout
    finally:
        mine = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
        for pid in mine:  # only the processes of the cluster this test started (its temp dir in their command)
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
