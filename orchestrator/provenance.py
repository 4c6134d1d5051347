"""What a run needs to be reproduced: code version (commit and uncommitted diff), interpreter and
package versions, hosts, seeds, and a fingerprint of the dataset it read. Nothing secret: the
diff leaves out credential files (.env, keys) and redacts secrets found in the rest."""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import platform
import re
import socket
import subprocess
import sys

from orchestrator.config import REDACTED, is_secret_name, scrub_text

MAX_DIFF_BYTES = 256 * 1024
PACKAGES = ("ray-orchestrator", "torch", "ray", "numpy", "fsspec", "s3fs", "prometheus-client", "pyyaml")


def _git(*args: str) -> str | None:
    try:
        # errors="replace": a diff of a non-UTF-8 file must not stop a launch
        out = subprocess.run(["git", *args], capture_output=True, text=True, errors="replace", timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info() -> dict:
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    raw = _git("diff", "HEAD") or ""
    diff = safe_diff(raw)
    info = {
        "commit": commit.strip(),
        "branch": (_git("rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None,
        "dirty": bool(raw) or bool((_git("status", "--porcelain", "--untracked-files=no") or "").strip()),
        "diff": diff[:MAX_DIFF_BYTES],
    }
    if len(diff) > MAX_DIFF_BYTES:
        info["diff_truncated_bytes"] = len(diff)
    return info


# Files whose diff is left out whole: they exist to hold secrets.
SECRET_FILES = (".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.ppk",
                "*.kdbx", "credentials*", "*secret*", ".netrc", "_netrc", ".pgpass", ".htpasswd", ".npmrc",
                ".pypirc", ".git-credentials", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*")
_FILE_HEADER = re.compile(r"^diff --git a/(.*) b/(.*)$")
# NAME=value, NAME: value, "name": "value", export NAME="value": a literal (no call, no lookup)
_ASSIGNMENT = re.compile(r"""^(?P<lead>\s*(?:export\s+)?["']?(?P<name>[A-Za-z_][\w.-]*)["']?\s*(?:=|:)\s*)"""
                         r"""(?P<value>"[^"]*"|'[^']*'|[^\s()\[\]{},"']+)(?P<rest>,?\s*(?:#.*)?)$""")


def safe_diff(diff: str) -> str:
    """A `git diff` fit to store: files that exist to hold secrets (.env, keys, credentials) are
    left out with a note, and the rest is scanned: values of secret-looking assignments, AWS key
    ids, private-key blocks and URL credentials are redacted."""
    out: list[str] = []
    skip = in_key = False
    for line in diff.splitlines(keepends=True):
        header = _FILE_HEADER.match(line.rstrip("\n"))
        if header:
            names = {header.group(1), header.group(2)}
            skip = any(_secret_file(n) for n in names)
            in_key = False
            out.append(line)
            if skip:
                out.append(f"(diff left out: {header.group(2)} may hold secrets)\n")
            continue
        if skip:
            continue
        if line[:1] not in "+- " or line.startswith(("+++ ", "--- ")):
            out.append(line)
            continue
        sign, body = line[0], line[1:]
        if "PRIVATE KEY-----" in body:
            in_key = "-----BEGIN" in body
            out.append(line)
            continue
        out.append(f"{sign}{REDACTED}\n" if in_key else sign + _scrub_line(body))
    return "".join(out)


def _secret_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_FILES)


def _scrub_line(body: str) -> str:
    end = "\n" if body.endswith("\n") else ""
    text = body[: len(body) - len(end)]
    m = _ASSIGNMENT.match(text)
    if m and is_secret_name(m.group("name").rsplit(".", 1)[-1]) and m.group("value").strip("\"'"):
        text = f"{m.group('lead')}{REDACTED}{m.group('rest')}"
    return scrub_text(text) + end


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def dataset_fingerprint(uri: str, storage_options: dict | None = None) -> str | None:
    """sha256 of the dataset's index, which lists every shard's own sha256."""
    import fsspec

    try:
        with fsspec.open(uri.rstrip("/") + "/index.json", "rb", **(storage_options or {})) as f:
            return hashlib.sha256(f.read()).hexdigest()
    except Exception:  # provenance is best effort: reading the data itself reports real problems
        return None


def collect(cfg) -> dict:
    return {
        "git": git_info(),
        "versions": versions(),
        "driver_host": socket.gethostname(),
        "seed": cfg.run.seed,
        "dataset": {"uri": scrub_text(cfg.data.uri), "index_sha256": dataset_fingerprint(cfg.data.uri, cfg.data.storage_options)},
    }
