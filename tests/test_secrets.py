"""Nothing secret is stored in clear: the config, the command line and the provenance git diff.
Redacted values can still be given back on resume. No Ray."""

from __future__ import annotations

import json
import subprocess

import pytest

from orchestrator import cli, provenance
from orchestrator.config import REDACTED, Config, flatten, load_config, redact, redact_override, scrub_text

SECRETS = ["hunter2", "s3cr3t-pw", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMIbPxRfiCYEXAMPLEKEY", "abc123==",
           "T000/B000/XXXX", "sk-live-42", "tok-9"]


def stored(obj) -> str:
    return json.dumps(obj)


def assert_clean(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"stored in clear: {leaked}\n{text}"


def test_config_secrets_the_issue_found_are_redacted(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("""
data:
  uri: s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIbPxRfiCYEXAMPLEKEY@bucket/tokens
  storage_options: {key: AKIAIOSFODNN7EXAMPLE, secret: wJalrXUtnFEMIbPxRfiCYEXAMPLEKEY, anon: false,
                    client_kwargs: {endpoint_url: "http://minio:hunter2@127.0.0.1:9000"}}
checkpoint:
  uri: https://user:s3cr3t-pw@store.example/ckpt?sv=2022&sig=abc123==
telemetry: {alert_webhook: "https://hooks.slack.com/services/T000/B000/XXXX"}
model:
  factory: tests.user_models:logging_gpt
  kwargs:
    passwd: hunter2
    credentials: {user: me, pw: s3cr3t-pw}
    connection_string: "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc123==;EndpointSuffix=x"
    blob: "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc123==;EndpointSuffix=x"
    nested: {deeper: {hf_token: tok-9, db: "postgresql://app:hunter2@db/x"}}
    servers: [{host: a, password: sk-live-42}]
""")
    red = redact(load_config(cfg).to_dict())
    assert_clean(stored(red))
    assert red["data"]["uri"] == "s3://bucket/tokens"  # where it is stays visible
    assert red["checkpoint"]["uri"].startswith("https://store.example/ckpt?sv=2022&sig=")
    assert red["data"]["storage_options"]["anon"] is False  # a boolean hides nothing
    assert red["data"]["storage_options"]["client_kwargs"]["endpoint_url"] == REDACTED
    assert red["telemetry"]["alert_webhook"] == REDACTED
    assert red["model"]["kwargs"]["credentials"] == {"user": REDACTED, "pw": REDACTED}
    assert "AccountName=a;AccountKey=<redacted>" in red["model"]["kwargs"]["blob"]
    assert red["model"]["kwargs"]["servers"] == REDACTED  # a list can only be given back whole


def test_ordinary_names_that_contain_secret_words_are_kept():
    kwargs = {"max_keys": 5, "key_dim": 64, "num_key_value_heads": 2, "tokenizer": "gpt2", "max_tokens": 9,
              "eos_token": "</s>", "pad_token_id": 0, "secret_name": "my-k8s-secret", "keep_best": "eval/loss"}
    assert redact({"model": {"kwargs": kwargs}}) == {"model": {"kwargs": kwargs}}
    plain = Config().to_dict()
    assert redact(plain) == plain  # no option of ours is a secret by its name


def test_redacted_values_are_asked_for_on_resume_and_accepted_when_given():
    from common.errors import UserError
    from orchestrator.driver import config_for

    cfg = Config()
    cfg.data.uri = "/data"
    cfg.data.storage_options = {"key": "AKIAIOSFODNN7EXAMPLE", "client_kwargs": {"endpoint_url": "http://h:9000"}}
    cfg.telemetry.alert_webhook = "https://hooks.example/T000/B000/XXXX"
    run = {"id": "r1", "config": redact(cfg.to_dict())}
    with pytest.raises(UserError) as e:
        config_for(run, [])
    for key in ("data.storage_options.key", "data.storage_options.client_kwargs.endpoint_url",
                "telemetry.alert_webhook"):
        assert key in str(e.value)
    again = config_for(run, ["data.storage_options.key=AKIAIOSFODNN7EXAMPLE",
                             "data.storage_options.client_kwargs.endpoint_url=http://h:9000",
                             "telemetry.alert_webhook=https://hooks.example/T000/B000/XXXX"])
    assert again.data.storage_options == cfg.data.storage_options
    assert again.telemetry.alert_webhook == cfg.telemetry.alert_webhook


def test_override_values_are_redacted_in_the_stored_command():
    argv = ["launch", "c.yaml", "data.storage_options.secret=wJalrXUtnFEMIbPxRfiCYEXAMPLEKEY",
            "model.kwargs.api_key=sk-live-42", "checkpoint.uri=s3://u:hunter2@b/x", "optim.lr=1e-3",
            "model.kwargs={passwd: s3cr3t-pw, n: 3}", "telemetry.alert_webhook=https://h/T000/B000/XXXX",
            "--address", "ray://admin:tok-9@head:10001"]
    command = cli.stored_command(argv)
    assert_clean(command)
    assert "optim.lr=1e-3" in command and "checkpoint.uri=s3://b/x" in command
    assert f"model.kwargs.api_key={REDACTED}" in command and "ray://head:10001" in command
    assert redact_override("run.name=plain") == "run.name=plain"


def test_launch_hands_the_driver_a_redacted_command(tmp_path, monkeypatch):
    import orchestrator.driver

    seen = {}
    monkeypatch.setattr(orchestrator.driver, "launch", lambda cfg, **kw: seen.update(kw, cfg=cfg))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {uri: /d}\n")
    assert cli.main(["launch", str(cfg), "data.storage_options.secret=hunter2", "model.kwargs.token=tok-9"]) == 0
    assert_clean(seen["command"])
    assert seen["cfg"].data.storage_options == {"secret": "hunter2"}  # the run itself gets the real value


def test_scrub_text_removes_embedded_credentials():
    assert scrub_text("see https://a:b@h/x and http://tok-9@h2") == "see https://h/x and http://h2"
    assert scrub_text("https://h/x?X-Amz-Signature=abc123==&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&y=1") == \
        f"https://h/x?X-Amz-Signature={REDACTED}&X-Amz-Credential={REDACTED}&y=1"
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----"
    assert "b3Blbn" not in scrub_text(pem)
    assert scrub_text("https://example.com/a@b") == "https://example.com/a@b"  # no userinfo there


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_provenance_diff_leaves_out_secret_files_and_scans_the_rest(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / ".env").write_text("DEBUG=1\n")
    (repo / "deploy.pem").write_text("nothing yet\n")
    (repo / "train.py").write_text("lr = 0.1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "init")
    (repo / ".env").write_text("DEBUG=1\nOPENAI_API_KEY=sk-live-42\n")
    (repo / "deploy.pem").write_text("-----BEGIN RSA PRIVATE KEY-----\nMIIEhunter2\n-----END RSA PRIVATE KEY-----\n")
    (repo / "train.py").write_text(
        "lr = 0.2\n"
        'API_TOKEN = "tok-9"\n'
        "aws = 'AKIAIOSFODNN7EXAMPLE'\n"
        'db = "postgresql://app:s3cr3t-pw@db/x"\n'
        "password = os.environ['PW']\n"
        "key = '''\n-----BEGIN EC PRIVATE KEY-----\nwJalrXUtnFEMIbPxRfiCYEXAMPLEKEY\n-----END EC PRIVATE KEY-----\n'''\n"
    )
    monkeypatch.chdir(repo)
    info = provenance.git_info()
    assert info["dirty"]
    diff = info["diff"]
    assert_clean(diff)
    assert "(diff left out: .env may hold secrets)" in diff and "(diff left out: deploy.pem may hold secrets)" in diff
    assert "+lr = 0.2" in diff and "password = os.environ['PW']" in diff  # the rest is still useful
    assert f'API_TOKEN = {REDACTED}' in diff


def test_provenance_stores_the_dataset_uri_without_credentials(monkeypatch):
    monkeypatch.setattr(provenance, "git_info", lambda: {"commit": None})
    monkeypatch.setattr(provenance, "dataset_fingerprint", lambda uri, options=None: None)
    cfg = Config()
    cfg.data.uri = "s3://AKIAIOSFODNN7EXAMPLE:hunter2@bucket/tokens"
    meta = provenance.collect(cfg)
    assert meta["dataset"]["uri"] == "s3://bucket/tokens"
    assert_clean(stored(meta))


def test_flatten_of_a_redacted_config_names_every_redacted_leaf():
    red = redact({"data": {"storage_options": {"a": 1, "b": {"c": "x"}, "d": True, "e": None}}})
    assert sorted(k for k, v in flatten(red).items() if v == REDACTED) == [
        "data.storage_options.a", "data.storage_options.b.c"]
