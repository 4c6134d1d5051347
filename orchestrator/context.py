"""`ctx`: what a user's training function gets, `fn(ctx, **kwargs)`, once per rank.

    ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.max_steps, ctx.config
    ctx.prepare(model)                    to the device, wrapped per parallelism (DDP, FSDP2)
    ctx.data_loader(dataset, batch_size)  per-rank batches in our deterministic sampler's order
    ctx.save(state, step) -> bool         a staggered, verified checkpoint when `step` is due
                                          (after `orchestrator stop`: the final one, then the end)
    ctx.restore(into=None) -> dict | None the state last saved, loaders and RNGs put back;
                                          sharded (FSDP) state loads in place, into= a template
    ctx.log(metrics, step)                tracking, alerts and the stall watchdog

and, for a loop that wants every service the built-in one has (orchestrator/gpt_function.py):

    ctx.autocast(), ctx.grad_sync(model, on)   train.precision; no reduction on accumulation steps
    ctx.phase(name, collectives=...)      what the hang watchdog reads: the phase and its collectives
    ctx.backward(loss, final=...)         backward, its gradient reduction counted (ctx.sharded: FSDP)
    ctx.reduce_gradients()                before reading gradients (waits in the async test mode)
    ctx.progress()                        a sign of life inside a long phase (eval)
    ctx.check_loss(value, loader)         a non-finite loss: fault_tolerance.on_nonfinite
    ctx.check_replicas(model, opt, step)  the silent-data-corruption check (health.sdc_check_every)

Steps are 0-based, as in `for step in range(ctx.max_steps)`: `save(state, step)` after step
`step` is done records `step + 1` steps done; `ctx.start_step` is where a restored run goes on.
Saved state is a dict of tensors and plain values (ints, floats, strings, lists, dicts): what
`torch.load(weights_only=True)` reads back, so a checkpoint is never a code source. A state that
holds DTensors (an FSDP model's and its optimizer's state dicts) is sharded: every rank writes
its slices through torch.distributed.checkpoint, and a restore re-slices them for any world size.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from checkpointing import templates
from checkpointing.format import holds_dtensors, plain, set_rng_state
from checkpointing.memory import read_sharded, sharded_keys  # a sharded checkpoint's, or snapshot's
from common.errors import NonFiniteLoss, UserError
from dataloading.sampler import GlobalSampler
from orchestrator import parallel, sdc, stopping, telemetry
from orchestrator.config import Config
from orchestrator.restore import restore_state


@contextmanager
def counted(health, collective: bool, device: torch.device):
    """Counts a phase that runs collectives (what the hang watchdog reads). On CUDA the host
    leaves the phase with its collectives queued, not done: a CUDA event recorded after them
    tells the heartbeat thread when they complete (hang/health.py)."""
    health.coll_entered += collective
    yield
    if collective and device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        health.completes_later(event)
    elif collective:
        health.coll_completed += 1


def data_index(step: int, skipped) -> int:
    """The global batch optimizer step `step` trains on when the batches in `skipped` are left
    out (batches that gave a non-finite loss, with fault_tolerance.on_nonfinite=rollback)."""
    d = step
    for k in sorted(skipped):
        if k <= d:
            d += 1
    return d


class Loader:
    """Batches of `batch_size` for this rank from a map-style dataset: rank r's slice of global
    batch k, where global batches follow our seeded sampler (or the GlobalSampler given). Iterating
    yields the rest of the current epoch, so `for epoch ...: for batch in loader:` works, and so
    does a resumed run that stopped mid-epoch. Its position is saved with every ctx.save and put
    back by ctx.restore. Global batches in `skipped` (a non-finite loss, rolled back) are passed
    over. A dataset with `__getitems__(ids)` (torch's batched read) is read a batch at a time."""

    def __init__(self, dataset, batch_size: int, *, rank: int, world_size: int, seed: int, collate_fn=None,
                 health=None, sampler: GlobalSampler | None = None, skipped=()):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise UserError(f"ctx.data_loader: expected a map-style dataset (with __len__ and __getitem__), "
                            f"got {type(dataset).__name__}")
        if int(batch_size) < 1:
            raise UserError(f"ctx.data_loader: batch_size must be at least 1, got {batch_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, int(batch_size), rank, world_size
        if sampler is None:
            sampler = GlobalSampler(len(dataset), self.batch_size * world_size, seed=seed)
        elif not isinstance(sampler, GlobalSampler):
            raise UserError(f"ctx.data_loader: sampler= must be a dataloading.sampler.GlobalSampler, "
                            f"got {type(sampler).__name__}")
        elif (sampler.num_samples, sampler.global_batch_size) != (len(dataset), self.batch_size * world_size):
            raise UserError(f"ctx.data_loader: the sampler covers {sampler.num_samples} samples in global batches of "
                            f"{sampler.global_batch_size}; expected {len(dataset)} (the dataset) in batches of "
                            f"batch_size x world size = {self.batch_size} x {world_size}")
        self.sampler = sampler
        self.collate = collate_fn or default_collate
        self.health = health
        self.skipped = frozenset(int(k) for k in skipped)
        self.position = 0  # global batches handed out (or passed over), across epochs
        self.index: int | None = None  # the global batch index of the batch last yielded

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch_of(self.position)

    def _pass_skipped(self) -> None:
        while self.position in self.skipped:
            self.position += 1

    def __iter__(self):
        self._pass_skipped()
        end = (self.epoch + 1) * self.sampler.batches_per_epoch
        many = getattr(self.dataset, "__getitems__", None)
        while self.position < end:
            if self.health is not None:
                self.health.phase = "data"
            ids = self.sampler.local_batch(self.position, self.rank, self.world_size)
            items = many(ids.tolist()) if many is not None else [self.dataset[int(i)] for i in ids]
            batch = self.collate(items)
            self.index = self.position
            self.position += 1
            self._pass_skipped()  # so a checkpoint taken now names the next batch trained on
            if self.health is not None:
                self.health.phase = "train"
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position, **self.sampler.state_dict(self.position)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples") != self.sampler.num_samples:
            raise UserError(f"ctx.data_loader: the checkpoint's dataset had {state.get('num_samples')} samples, "
                            f"this one has {self.sampler.num_samples}; restore it with the same dataset")
        self.position = int(state["samples_consumed"]) // self.sampler.global_batch_size


class _State:
    """A user's state dict where the checkpoint writer expects a module (it calls state_dict())."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _builtin_layout(loaded) -> bool:
    """Whether a checkpoint holds a model and its optimizer (the built-in loop's layout) rather
    than ctx.save's {"state": ..., "loaders": ...}."""
    if loaded.sharded:
        return "model.loaders" not in sharded_keys(loaded)
    return not (isinstance(loaded.model, dict) and "state" in loaded.model and "loaders" in loaded.model)


def _model_and_optimizer(state: dict | None, where: str):
    """(model, optimizer) when `state` is {"model": a module, "optimizer": an optimizer} (the
    built-in loop's checkpoint layout); None when it holds neither objects."""
    if state is None:
        return None
    objects = [k for k, v in state.items() if isinstance(v, (torch.nn.Module, torch.optim.Optimizer))]
    if not objects:
        return None
    model, optimizer = state.get("model"), state.get("optimizer")
    if set(state) != {"model", "optimizer"} or not isinstance(model, torch.nn.Module) \
            or not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(f"{where}: a module or optimizer itself (here at {objects[0]!r}) goes only in "
                        "{'model': model, 'optimizer': optimizer}; save their state_dict()s otherwise")
    return parallel.unwrap(model), optimizer


_SAVED = "model.state."  # where ctx.save puts the user's state in a sharded checkpoint (DCP's dotted keys)


class TrainContext:
    def __init__(self, cfg: Config, services, *, skipped=()):
        m = services.member
        self.config, self.rank, self.world_size, self.local_rank = cfg, m.rank, m.world_size, m.local_rank
        self.device: torch.device = m.device
        self.max_steps: int = cfg.train.max_steps
        self._services = services
        self._loaders: list[Loader] = []
        self._restored = False
        self._saved_loaders: list[dict] = []  # the restored checkpoint's loader positions
        self.start_step = services.loaded.step if services.loaded is not None else 0
        self.last_step = -1
        self.stopped_at: int | None = None  # steps done when `orchestrator stop` ended the function
        self._stop = stopping.Agreement(self.world_size, self.device, services.health)
        self.sharded = False  # set by prepare(): the model is sharded (FSDP), so forward runs collectives too
        self._reducer = None
        self.skipped = tuple(skipped)  # global batches left out after a non-finite loss (rolled back)
        self.first_loss = self.last_loss = self.eval_loss = None
        self._logged, self._logged_step = {}, None
        self.started = time.perf_counter()
        telemetry.set_step(self.start_step)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank

    # --- the model and the data ---------------------------------------------------------

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this rank's device, wrapped per parallelism.strategy (DDP, or FSDP2 per
        block: orchestrator/parallel.py) when there is more than one rank, compiled with
        train.compile; afterwards each rank draws its own random numbers (dropout), seeded by run
        and rank. Build the optimizer from the returned module."""
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"ctx.prepare: expected a torch.nn.Module, got {type(model).__name__}")
        cfg = self.config
        async_grads = cfg.distributed.async_collectives and self.world_size > 1  # a test mode (config.py)
        wrapped = parallel.wrap_model(model, strategy=cfg.parallelism.strategy, device=self.device,
                                      world_size=self.world_size, compile=cfg.train.compile, async_grads=async_grads)
        self._reducer = parallel.AsyncGradReduce(model, self.world_size) if async_grads else None
        self.sharded = parallel.is_sharded(wrapped)
        torch.manual_seed(cfg.run.seed * 1000 + self.rank + 1)
        return wrapped

    def data_loader(self, dataset, batch_size: int, *, collate_fn=None, sampler: GlobalSampler | None = None) -> Loader:
        """`batch_size` per rank; the global batch is batch_size x world_size. `sampler`: a
        dataloading GlobalSampler over the dataset to take the order from (e.g. a TokenDataset's
        `sampler(cfg.data, seed=...)`, with data.shuffle and remote-shard prefetch) instead of the
        default seeded global shuffle."""
        loader = Loader(dataset, batch_size, rank=self.rank, world_size=self.world_size,
                        seed=self.config.run.seed + len(self._loaders), collate_fn=collate_fn,
                        health=self._services.health, sampler=sampler, skipped=self.skipped)
        self._loaders.append(loader)
        if self._restored:  # made after restore(): put its position back too
            self._restore_loader(len(self._loaders) - 1, loader)
        return loader

    # --- what the built-in loop's services read ----------------------------------------

    def autocast(self):
        """Mixed precision per train.precision (bf16 autocast, on CPU too; fp32: nothing)."""
        return parallel.autocast(self.device, self.config.train.precision)

    def grad_sync(self, model: torch.nn.Module, enabled: bool):
        """Put forward and backward of a micro-batch inside: with `enabled` false (the
        accumulation micro-steps before the last) no gradient is reduced across ranks."""
        return parallel.grad_sync(model, enabled)

    @contextmanager
    def phase(self, name: str, *, collectives: bool = False):
        """A phase of the step, as the hang watchdog reads it ("forward", "backward",
        "optimizer", "eval", ...), and whether it runs collectives (counted, so a rank that
        never entered one is named). Nothing is counted on one rank."""
        health = self._services.health
        health.phase = name
        with counted(health, collectives and self.world_size > 1, self.device):
            yield

    def backward(self, loss: torch.Tensor, *, final: bool = True) -> None:
        """`loss.backward()` in the "backward" phase, the gradient reduction it runs counted for the
        hang watchdog: the last micro-batch's (`final`), or every one's on a sharded model. With
        distributed.async_collectives (a test mode) the last one's reduction is issued after it,
        without waiting: then ctx.reduce_gradients() waits for it."""
        with self.phase("backward", collectives=(final or self.sharded) and self._reducer is None):
            loss.backward()
        if final and self._reducer is not None:
            health = self._services.health
            health.coll_entered += 1
            health.completes_later(self._reducer.issue())

    def reduce_gradients(self) -> None:
        """Before anything reads the gradients (clipping, the optimizer): they are reduced across
        ranks by now. Only distributed.async_collectives leaves anything to wait for here."""
        if self._reducer is not None:
            self._services.health.phase = "optimizer"
            self._reducer.wait()

    def progress(self) -> None:
        """A sign of life for the stall watchdog inside a long phase that logs no step (eval)."""
        self._services.health.progress += 1

    def check_loss(self, value: float, loader: Loader | None = None) -> None:
        """Raise NonFiniteLoss when `value` is NaN or inf (call it before the optimizer step, so the
        weights stay as they were): the run fails, or with fault_tolerance.on_nonfinite=rollback
        restarts from the last checkpoint and passes over the batch `loader` yielded last."""
        if not math.isfinite(value):
            raise NonFiniteLoss(loader.index if loader is not None and loader.index is not None else self.last_step + 1,
                                value)

    def check_replicas(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """After the optimizer step of step `step` (0-based): every health.sdc_check_every steps
        and at the last, the ranks compare checksums of their weights and optimizer state and a
        rank that differs is named (SilentCorruption). Call it on every rank, before ctx.save.
        Returns whether it checked; one rank or a sharded model (FSDP): nothing to compare."""
        every, done = self.config.health.sdc_check_every, int(step) + 1
        if self.world_size < 2 or not every or parallel.is_sharded(model):
            return False
        if done % every and done < self.max_steps:
            return False
        with self.phase("optimizer", collectives=True):
            sdc.check(parallel.unwrap(model), optimizer, step=done, device=self.device)
        return True

    # --- checkpoints --------------------------------------------------------------------

    def save(self, state: dict, step: int) -> bool:
        """Checkpoint `state` (with every loader's position and the RNG states) when step `step`
        is due under checkpoint.every_steps, or is the last; returns whether it saved.

        Call it on every rank at the same steps (it is where the ranks agree to stop). After
        `orchestrator stop`, the ranks agree on a step (within two calls), save it whatever
        every_steps says and end the function there: save raises stopping.Stop (a BaseException,
        like SystemExit, so `except Exception` does not catch it), which the orchestrator handles."""
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UserError(f"ctx.save: expected a state dict (a dict with string keys, e.g. "
                            f"{{'model': model.state_dict(), 'optimizer': opt.state_dict()}}), got {type(state).__name__}")
        objects = _model_and_optimizer(state, "ctx.save")
        if objects is not None and len(self._loaders) != 1:  # at every call: found at the first step, not the first save
            raise UserError(f"ctx.save: {{'model': model, 'optimizer': optimizer}} keeps one ctx.data_loader's "
                            f"position, and there are {len(self._loaders)}; save their state_dict()s instead")
        checkpointer = self._services.checkpointer
        done = int(step) + 1
        snapshots = self._services.snapshots  # checkpoint.memory_every_steps: to a peer node's memory
        if snapshots is not None and done < self.max_steps and snapshots.due(done):
            snapshots.take(done, **self._layout(state, objects, done, sharded=holds_dtensors(state)),
                           log=self._services.sender)
        stop = self._stop.should_stop() and done < self.max_steps
        if checkpointer is None or not (stop or checkpointer.due(done, done >= self.max_steps)):
            if stop:
                self._stopped(done)
            return False
        health = self._services.health
        phase, health.phase = health.phase, "checkpoint"
        checkpointer.save(done, **self._layout(state, objects, done, sharded=holds_dtensors(state)),
                          metrics=self._logged if self._logged_step == int(step) else None, log=self._services.sender)
        health.phase = phase
        if stop:
            self._stopped(done)
        return True

    def _layout(self, state: dict, objects, done: int, *, sharded: bool) -> dict:
        """What the checkpoint writer gets. {"model": module, "optimizer": optimizer} is written
        as the built-in GPT loop writes it (weights, optimizer, and the one loader's sampler
        state per rank), so either can resume or fork the other's checkpoints; any other state as
        {"state": ..., "loaders": [...]}."""
        if objects is not None:
            model, optimizer = objects
            loader = self._loaders[0]
            return {"model": model, "optimizer": optimizer, "sampler_state": loader.sampler.state_dict(loader.position)}
        # the loaders' positions are global, so they travel with the replicated state: a rank that
        # did not exist when it was saved (a larger group) finds them there too; RNGs are per rank
        loaders = [loader.state_dict() for loader in self._loaders]
        if sharded:  # through DCP, where a list of dicts would need a template: one value
            loaders = json.dumps(loaders)
        return {"model": _State({"state": plain(state), "loaders": loaders}), "optimizer": None,
                "sampler_state": {"steps_done": done}}

    def _stopped(self, done: int):
        self.stopped_at = done
        raise stopping.Stop(done)

    def close(self) -> None:
        """After the user's function returned: the ranks' last stop agreement completes."""
        self._stop.close()

    def restore(self, into: dict | None = None) -> dict | None:
        """After a restart, resume or fork: the state last saved, with the loaders and the random
        number generators put back; None on a fresh start. Call it on every rank.

        A sharded state (one that held DTensors: an FSDP model's and optimizer's state dicts) is
        read by every rank together into tensors it already has, shaped for this rank (any world
        size): pass `into`, a dict shaped like the state given to ctx.save, e.g.
        `ctx.restore(into={"model": model, "optimizer": opt, "step": 0})`. A module or optimizer
        there stands for its state_dict() and is loaded (a fresh optimizer gets its state created
        first); tensors in `into` are filled in place; the state returned is `into`'s structure
        with the saved values. Without `into`, a sharded checkpoint is a UserError. On a
        replicated checkpoint `into` is optional: the saved state is returned and the modules
        and optimizers in `into` are loaded from it.

        A checkpoint in the built-in loop's layout (what `ctx.save({"model": model, "optimizer":
        opt}, step)` writes, and the built-in loop always wrote) loads with `into={"model": model,
        "optimizer": opt}`, across strategies and world sizes as the built-in loop's did; the one
        data loader (made before) goes on at the saved position."""
        loaded = self._services.loaded
        if loaded is None:
            self._restored = True
            return None
        if into is not None and not isinstance(into, dict):
            raise UserError(f"ctx.restore: into= must be a dict shaped like the state given to ctx.save, "
                            f"got {type(into).__name__}")
        if _builtin_layout(loaded):
            return self._read_builtin(loaded, into)
        state = self._read_sharded(loaded, into) if loaded.sharded else self._read_replicated(loaded, into)
        self._restored = True
        if loaded.rank_state is not None:
            set_rng_state(loaded.rank_state["rng"])
        else:  # a rank that did not exist when it was saved: seeded by run, rank and step instead
            torch.manual_seed(self.config.run.seed * 1000 + self.rank + 1 + loaded.step * 7919)
        for i, loader in enumerate(self._loaders):
            self._restore_loader(i, loader)
        return state

    def _read_builtin(self, loaded, into: dict | None) -> dict:
        objects = _model_and_optimizer(into, "ctx.restore")
        if objects is None or len(self._loaders) != 1:
            raise UserError(f"ctx.restore: the checkpoint of step {loaded.step} is in the built-in loop's layout "
                            "(a model, its optimizer and one loader's position): make the data loader first and "
                            "pass into={'model': model, 'optimizer': optimizer}")
        model, optimizer = objects
        loader = self._loaders[0]
        step = restore_state(loaded, model=model, optimizer=optimizer, sampler=loader.sampler, seed=self.config.run.seed,
                             rank=self.rank, world_size=self.world_size,
                             data_step=lambda s: data_index(s, self.skipped))  # RNG streams too
        loader.position = data_index(step, self.skipped)
        self._restored = True
        return into

    def _read_replicated(self, loaded, into: dict | None) -> dict:
        state = loaded.model["state"]
        for path, obj in templates.objects_in(into):
            try:
                obj.load_state_dict(templates.at(state, path))
            except KeyError as e:
                raise UserError(f"ctx.restore: into= has {type(obj).__name__} at {e.args[0]!r}; the checkpoint "
                                f"of step {loaded.step} has nothing there") from None
        self._saved_loaders = list(loaded.model.get("loaders", []))
        return state

    def _read_sharded(self, loaded, into: dict | None) -> dict:
        """Every rank together: DCP fills `into`'s template; nothing saved may be left unread."""
        if into is None:
            raise UserError(f"ctx.restore: the checkpoint of step {loaded.step} holds sharded (FSDP) state, which "
                            "loads in place: pass a template of what you saved, e.g. "
                            "ctx.restore(into={'model': model, 'optimizer': opt, 'step': 0})")
        template = templates.template(into)
        box = {"model": {"state": template.state, "loaders": ""}}
        try:
            unread = read_sharded(loaded, box)
        except (RuntimeError, ValueError, KeyError) as e:  # a template of another shape than the checkpoint
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(_SAVED, "")
            raise UserError(f"ctx.restore: into= does not fit the checkpoint of step {loaded.step}: {first}") from None
        unread = [k.removeprefix(_SAVED) for k in unread if k.startswith(_SAVED)]
        if unread:
            more = f" (and {len(unread) - 1} more)" if len(unread) > 1 else ""
            raise UserError(f"ctx.restore: the checkpoint of step {loaded.step} holds {unread[0]}{more}, which into= "
                            "lacks; pass a template of everything saved (an optimizer itself, not a fresh "
                            "optimizer's state dict: that has no state yet)")
        template.load_objects()
        self._saved_loaders = json.loads(box["model"]["loaders"])
        return box["model"]["state"]

    def _restore_loader(self, i: int, loader: Loader) -> None:
        if i < len(self._saved_loaders):
            loader.load_state_dict(self._saved_loaders[i])

    # --- tracking -----------------------------------------------------------------------

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Metrics of step `step` (0-based): stored per rank, watched for anomalies, and the
        watchdog's sign of progress. After it, `orchestrator.telemetry.log` without a step (from
        a model's own code) counts as the next step's."""
        values = {}
        for k, v in metrics.items():
            values[k] = float(v.item() if isinstance(v, torch.Tensor) else v)
        self._services.sender.log(values, step=int(step))
        if step != self._logged_step:  # what a checkpoint of this step records with it
            self._logged, self._logged_step = {}, step
        self._logged.update(values)
        health = self._services.health
        if step > self.last_step:
            health.step, self.last_step = int(step), int(step)
            health.progress += 1
            telemetry.set_step(int(step) + 1)
        if "train/loss" in values or "loss" in values:
            loss = values.get("train/loss", values.get("loss"))
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
        if "eval/loss" in values:
            self.eval_loss = values["eval/loss"]

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
