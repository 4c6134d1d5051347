"""Bad numbers, oversized and explosive YAML, bad webhook URLs and hostile stored text: each is one
clear line and a non-zero exit, never a traceback, a hang or a terminal taken over. No Ray."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from common.errors import ConfigError, UserError
from common.schema import describe
from orchestrator import cli
from orchestrator.config import MAX_CONFIG_BYTES, Config, load_config
from orchestrator.store import Store
from tests.conftest import ORCH, REPO

FLOAT_KEYS = [k for k, t, _, _ in describe(Config) if t.startswith("float")]
INT_KEYS = [k for k, t, _, _ in describe(Config) if t.startswith("int")]


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def error_line(capsys, argv, code=2) -> str:
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


# --- numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "1e400"])
def test_non_finite_floats_are_refused_for_every_float_option(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert f"{key}: expected a finite number, got" in str(e.value)


@pytest.mark.parametrize("key", INT_KEYS)
def test_absurd_integers_are_refused_for_every_int_option(key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={10**26}"])
    assert f"{key}: expected a value " in str(e.value) and "got 1e+26" in str(e.value)


def test_max_steps_1e26_is_refused_with_path_value_and_range(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train: {max_steps: 1e26}\n"))
    assert str(e.value) == f"{tmp_path / 'c.yaml'}: train.max_steps: expected a value between 1 and 1000000000, got '1e26'"
    with pytest.raises(ConfigError, match=r"hang.timeout_s: expected a finite number, got inf"):
        load_config(write(tmp_path, "hang: {timeout_s: .inf}\n"))
    with pytest.raises(ConfigError, match=r"optim.lr: expected a finite number, got nan"):
        load_config(write(tmp_path, "optim: {lr: .nan}\n"))


def test_whole_numbers_may_be_written_with_an_exponent_but_fractions_are_not_counts(tmp_path):
    assert load_config(write(tmp_path, "train: {max_steps: 1e3}\n")).train.max_steps == 1000
    assert load_config(None, ["train.max_steps=2000.0"]).train.max_steps == 2000
    with pytest.raises(ConfigError, match=r"train.max_steps: expected an integer, got float 1.5"):
        load_config(None, ["train.max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"expected an integer, got a string '1e-3'"):
        load_config(None, ["train.max_steps=1e-3"])


def test_ports_and_timeouts_have_sane_ranges():
    with pytest.raises(ConfigError, match=r"telemetry.prometheus_port: expected a value between 0 and 65535"):
        load_config(None, ["telemetry.prometheus_port=70000"])
    with pytest.raises(ConfigError, match=r"hang.timeout_s: expected a value between 1 and 2592000, got '1e300'"):
        load_config(None, ["hang.timeout_s=1e300"])


# --- YAML size ---------------------------------------------------------------------------

LAUGHS = "\n".join(
    ["model:", "  kwargs:", "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
) + "\n"


def test_billion_laughs_in_model_kwargs_is_refused_before_it_expands(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, LAUGHS))
    assert "invalid YAML at line" in str(e.value) and "expands to more than 1,000,000 values" in str(e.value)


def test_alias_bomb_in_an_override_is_refused_too():
    small = "[&a [x, x, x], *a, *a]"  # aliases themselves are fine
    assert load_config(None, [f"model.kwargs.ok={small}"]).model.kwargs["ok"] == [["x"] * 3] * 3
    levels = ["k0: &b0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"k{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="override model.kwargs: invalid YAML .*expands to more than"):
        load_config(None, ["model.kwargs={" + ", ".join(levels) + "}"])


def test_recursive_alias_and_deep_nesting_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path, "model: {kwargs: {a: &a [x, *a]}}\n"))
    with pytest.raises(ConfigError, match="nested"):
        load_config(write(tmp_path, "model: {kwargs: {a: " + "[" * 200 + "]" * 200 + "}}\n"))
    with pytest.raises(ConfigError, match="nested"):
        load_config(write(tmp_path, "model: {kwargs: {a: " + "[" * 5000 + "]" * 5000 + "}}\n"))


def test_config_file_size_is_capped_with_the_file_named(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("model:\n  kwargs:\n    blob: '" + "x" * (MAX_CONFIG_BYTES + 10) + "'\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "larger than 1024 KiB" in str(e.value)


def test_unreadable_and_binary_config_files_are_one_line(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"run: {name: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(p)


# --- webhook URL -------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://hooks.example/x", "hooks.example/x", "http://", "https:///path",
                                 "http://[::1/x", "http://h:99999/x", "http://h/a b", "javascript:alert(1)", ""])
def test_bad_webhook_urls_are_refused_at_load(url):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"telemetry.alert_webhook={json.dumps(url)}"])
    assert "telemetry.alert_webhook=" in str(e.value) and "http:// or https:// URL with a host" in str(e.value)


def test_good_webhook_urls_load():
    for url in ("http://127.0.0.1:8080/hook", "https://hooks.example.com/services/T/B/X", "http://[::1]:9/x"):
        assert load_config(None, [f"telemetry.alert_webhook={url}"]).telemetry.alert_webhook == url


# --- the CLI -----------------------------------------------------------------------------


def test_bad_where_is_one_line(home, capsys):
    Store().close()
    err = error_line(capsys, ["runs", "--where", "a=[unclosed"])
    assert "--where 'a=[unclosed'" in err and "invalid YAML" in err


@pytest.fixture
def hostile_run(home):
    store = Store()
    store.create_run(run_id="r1", name="\x1b[31mX\x1b]0;owned\x07", config={"optim": {"lr": 0.1}}, git_commit=None,
                     host="h", command="c", world_size=1, tags={"t\x1b[2J": "v\x08\x08"})
    store.add_note("r1", "note \x1b[1Abold\u202eevil")
    store.log_metrics("r1", [("train/loss", 0, 0, 1.0, 0.0), ("train/loss", 1, 0, math.nan, 0.0),
                             ("train/loss", 2, 0, math.inf, 0.0)])
    store.finish_run("r1", "failed", error="boom \x1b[0m", summary={"last_loss": math.nan, "best": -math.inf})
    store.close()
    return "r1"


def test_stored_text_is_printed_with_control_characters_escaped(hostile_run, capsys):
    for argv in (["runs"], ["show", hostile_run]):
        assert cli.main(argv) == 0
        printed = capsys.readouterr().out
        assert "\x1b" not in printed and "\x07" not in printed and "\x08" not in printed and "\u202e" not in printed
        assert "\\x1b[31mX" in printed
    assert cli.main(["show", hostile_run]) == 0
    assert "note \\x1b[1Abold\\u202eevil" in capsys.readouterr().out


def strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict_with_nan_and_inf_as_null(hostile_run, capsys):
    assert cli.main(["show", hostile_run, "--json"]) == 0
    shown = strict(capsys.readouterr().out)
    assert shown["summary"] == {"last_loss": None, "best": None} and shown["name"] == "\x1b[31mX\x1b]0;owned\x07"
    assert cli.main(["metrics", hostile_run, "--key", "train/loss", "--json"]) == 0
    points = strict(capsys.readouterr().out)["points"]
    assert [p["value"] for p in points] == [1.0, None, None]
    assert cli.main(["runs", "--json"]) == 0
    assert [r["id"] for r in strict(capsys.readouterr().out)] == [hostile_run]


def test_output_piped_into_head_ends_quietly(home):
    store = Store()
    store.create_run(run_id="r1", name="n", config={}, git_commit=None, host="h", command="c", world_size=1)
    store.log_metrics("r1", [("train/loss", s, 0, 1.0 / (s + 1), 0.0) for s in range(20_000)])
    store.close()
    cmd = " ".join([*ORCH, "metrics", "r1", "--key", "train/loss", "--buckets", "20000"])
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -n 3"], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env={"ORCHESTRATOR_HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 3
    assert proc.returncode == 141


def test_a_bug_is_one_internal_error_line_even_without_a_writable_home(tmp_path, monkeypatch, capsys):
    home = tmp_path / "a-file"
    home.write_text("not a directory")
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(home))

    def boom(args, argv):
        raise RuntimeError("line one\nline two https://u:hunter2@h/x")

    monkeypatch.setitem(cli.COMMANDS, "data", boom)
    err = error_line(capsys, ["data", "prepare", "x", "--out", "y"], code=1)
    assert err.startswith("orchestrator: internal error: RuntimeError: line one line two https://h/x (traceback in ")
    assert "hunter2" not in err


def test_a_multi_line_user_error_is_one_line(monkeypatch, capsys, home):
    def fail(args, argv):
        raise UserError("first\nsecond \x1b[31m")

    monkeypatch.setitem(cli.COMMANDS, "data", fail)
    assert error_line(capsys, ["data", "prepare", "x", "--out", "y"]) == "orchestrator: error: first second \\x1b[31m"


def test_bad_numeric_argument_is_one_line(home, capsys):
    Store().close()
    assert "invalid int value" in error_line(capsys, ["metrics", "r1", "--key", "k", "--buckets", "1e400"])


def test_cli_entry_point_never_prints_a_traceback_for_bad_where(home):
    Store().close()
    proc = subprocess.run([*ORCH, "runs", "--where", "a=[unclosed"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={"ORCHESTRATOR_HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
