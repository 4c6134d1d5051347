"""Users' own training code, run per rank with every service around it.

  run_function  `entrypoint.function: "module:fn"`: fn(ctx, **kwargs) in the rank's process
  run_gpt       no entrypoint: the built-in GPT loop, itself a function on ctx (gpt_function.py)
  run_script    `entrypoint.script: PATH`: the script, unchanged, in a child process with
                torchrun's environment; its output captured line by line (script.py)

`load_function` is also the pre-flight check (validate.py): a bad module or signature is one
line before any worker starts.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

from common.errors import ConfigError, NonFiniteLoss, SilentCorruption, UserCodeError, UserError
from orchestrator import rank, rendezvous, stopping
from orchestrator.config import Config

_ROOT = Path(__file__).resolve().parent.parent
OURS = tuple(str(_ROOT / p) + "/" for p in ("orchestrator", "actors", "checkpointing", "dataloading", "common"))


def load_function(spec: str, workdir: str | None, kwargs: dict | None = None):
    """The user's function from "module:function", importable from the working directory, and
    callable as fn(ctx, **kwargs) (entrypoint.kwargs)."""
    if workdir and workdir not in sys.path:
        sys.path.insert(0, workdir)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user module can fail to import in any way
        raise ConfigError(f"entrypoint.function={spec!r}: cannot import {module_name}: "
                          f"{type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"entrypoint.function={spec!r}: {module_name} has no function {attr!r}")
    try:
        inspect.signature(fn).bind(object(), **(kwargs or {}))
    except TypeError as e:
        raise ConfigError(f"entrypoint.function={spec!r}: expected a function taking ctx as its first argument and "
                          f"entrypoint.kwargs {sorted(kwargs or {})} ({e}), got {attr}{inspect.signature(fn)}") from None
    except ValueError:  # a builtin without a signature: let the call decide
        pass
    return fn


def run_function(cfg: Config, *, skipped: list[int] = (), **kw) -> dict:
    """Call the user's function with a ctx; return the summary the controller shows."""
    e = cfg.entrypoint
    fn = load_function(e.function, e.workdir, e.kwargs)
    return call_with_ctx(cfg, lambda ctx: fn(ctx, **e.kwargs), user=e.function, skipped=skipped, **kw)


def run_gpt(cfg: Config, *, skipped: list[int] = (), **kw) -> dict:
    """The built-in GPT loop, as the function it is written as (gpt_function.train_gpt): our
    code, so its exceptions are ours, not a user's."""
    from orchestrator.gpt_function import train_gpt  # torch: only in the rank's process

    return call_with_ctx(cfg, train_gpt, user=None, skipped=skipped, **kw)


def call_with_ctx(cfg: Config, fn, *, user: str | None, skipped=(), **kw) -> dict:
    """fn(ctx) on this rank with every service around it. `user`: the user's "module:function",
    whose exceptions are reported as theirs (user_code_error)."""
    from orchestrator.context import TrainContext  # torch: only in the rank's process

    with rank.services(cfg, **kw) as s:
        ctx = TrainContext(cfg, s, skipped=skipped)
        try:
            fn(ctx)
        except stopping.Stop:  # `orchestrator stop`: ctx.save saved the agreed step and ended the function
            pass
        except (NonFiniteLoss, SilentCorruption):  # ctx.check_loss / check_replicas: the restart policy's
            raise
        except Exception as err:
            if user is None:
                raise
            raise user_code_error(err, where=user) from None
        ctx.close()  # the ranks' last stop agreement, still in flight when the function returned
        if s.checkpointer is not None:
            s.checkpointer.close(s.sender)  # waits for the last upload and its commit
        s.health.phase = "done"
    rendezvous.leave()
    return {"steps": max(0, ctx.last_step + 1 - ctx.start_step),
            "start_step": ctx.start_step, "first_loss": ctx.first_loss, "last_loss": ctx.last_loss,
            "eval_loss": ctx.eval_loss, "train_time_s": time.perf_counter() - ctx.started,
            "stopped": ctx.stopped_at is not None, "stopped_at": ctx.stopped_at}


def user_code_error(err: BaseException, *, where: str) -> Exception:
    """The user's exception, as one line naming their innermost frame, with the traceback of
    their frames only (ours and Ray's left out) for the CLI to show once. A UserError (ctx used
    wrongly) stays one: restarting cannot help."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(OURS)]
    if not frames:
        frames = traceback.extract_tb(err.__traceback__)[-1:]
    last = frames[-1] if frames else None
    at = f" (at {last.filename}:{last.lineno} in {last.name})" if last else ""
    text = "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(type(err), err))
    if isinstance(err, UserError):
        return UserError(f"{str(err).strip()}{at}")
    return UserCodeError(f"{where} raised {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}{at}",
                         "Traceback (the user's frames):\n" + text)
