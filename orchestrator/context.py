"""`ctx`: what a user's training function gets, `fn(ctx, **kwargs)`, once per rank.

    ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.max_steps, ctx.config
    ctx.prepare(model)                    to the device, wrapped per parallelism (DDP, FSDP2)
    ctx.data_loader(dataset, batch_size)  per-rank batches in our deterministic sampler's order
    ctx.save(state, step) -> bool         a staggered, verified checkpoint when `step` is due
                                          (after `orchestrator stop`: the final one, then the end)
    ctx.restore(into=None) -> dict | None the state last saved, loaders and RNGs put back;
                                          sharded (FSDP) state loads in place, into= a template
    ctx.log(metrics, step)                tracking, alerts and the stall watchdog

Steps are 0-based, as in `for step in range(ctx.max_steps)`: `save(state, step)` after step
`step` is done records `step + 1` steps done; `ctx.start_step` is where a restored run goes on.
Saved state is a dict of tensors and plain values (ints, floats, strings, lists, dicts): what
`torch.load(weights_only=True)` reads back, so a checkpoint is never a code source. A state that
holds DTensors (an FSDP model's and its optimizer's state dicts) is sharded: every rank writes
its slices through torch.distributed.checkpoint, and a restore re-slices them for any world size.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from checkpointing import templates
from checkpointing.format import holds_dtensors, plain, set_rng_state
from checkpointing.loader import read_sharded, sharded_keys
from common.errors import UserError
from dataloading.sampler import GlobalSampler
from orchestrator import parallel, stopping
from orchestrator.config import Config


class Loader:
    """Batches of `batch_size` for this rank from a map-style dataset: rank r's slice of global
    batch k, where global batches follow our seeded sampler. Iterating yields the rest of the
    current epoch, so `for epoch ...: for batch in loader:` works, and so does a resumed run that
    stopped mid-epoch. Its position is saved with every ctx.save and put back by ctx.restore."""

    def __init__(self, dataset, batch_size: int, *, rank: int, world_size: int, seed: int, collate_fn=None,
                 health=None):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise UserError(f"ctx.data_loader: expected a map-style dataset (with __len__ and __getitem__), "
                            f"got {type(dataset).__name__}")
        if int(batch_size) < 1:
            raise UserError(f"ctx.data_loader: batch_size must be at least 1, got {batch_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, int(batch_size), rank, world_size
        self.sampler = GlobalSampler(len(dataset), self.batch_size * world_size, seed=seed)
        self.collate = collate_fn or default_collate
        self.health = health
        self.position = 0  # global batches handed out, across epochs

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch_of(self.position)

    def __iter__(self):
        end = (self.epoch + 1) * self.sampler.batches_per_epoch
        while self.position < end:
            if self.health is not None:
                self.health.phase = "data"
            ids = self.sampler.local_batch(self.position, self.rank, self.world_size)
            batch = self.collate([self.dataset[int(i)] for i in ids])
            self.position += 1
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


_SAVED = "model.state."  # where ctx.save puts the user's state in a sharded checkpoint (DCP's dotted keys)


class TrainContext:
    def __init__(self, cfg: Config, services):
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
        self.first_loss = self.last_loss = None
        self.started = time.perf_counter()
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank, as the built-in loop

    # --- the model and the data ---------------------------------------------------------

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this rank's device, wrapped per parallelism.strategy (DDP, or FSDP2 per
        block: orchestrator/parallel.py) when there is more than one rank, compiled with
        train.compile; afterwards each rank draws its own random numbers (dropout), seeded by run
        and rank. Build the optimizer from the returned module."""
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"ctx.prepare: expected a torch.nn.Module, got {type(model).__name__}")
        model = parallel.wrap_model(model, strategy=self.config.parallelism.strategy, device=self.device,
                                    world_size=self.world_size, compile=self.config.train.compile)
        torch.manual_seed(self.config.run.seed * 1000 + self.rank + 1)
        return model

    def data_loader(self, dataset, batch_size: int, *, collate_fn=None) -> Loader:
        """`batch_size` per rank; the global batch is batch_size x world_size."""
        loader = Loader(dataset, batch_size, rank=self.rank, world_size=self.world_size,
                        seed=self.config.run.seed + len(self._loaders), collate_fn=collate_fn,
                        health=self._services.health)
        self._loaders.append(loader)
        if self._restored:  # made after restore(): put its position back too
            self._restore_loader(len(self._loaders) - 1, loader)
        return loader

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
        checkpointer = self._services.checkpointer
        done = int(step) + 1
        snapshots = self._services.snapshots  # checkpoint.memory_every_steps: to a peer node's memory
        if snapshots is not None and done < self.max_steps and snapshots.due(done):
            snapshots.take(done, model=_State({"state": plain(state), "loaders": [lo.state_dict() for lo in self._loaders]}),
                           optimizer=None, sampler_state={"steps_done": done}, log=self._services.sender)
        stop = self._stop.should_stop() and done < self.max_steps
        if checkpointer is None or not (stop or checkpointer.due(done, done >= self.max_steps)):
            if stop:
                self._stopped(done)
            return False
        health = self._services.health
        phase, health.phase = health.phase, "checkpoint"
        # the loaders' positions are global, so they travel with the replicated state: a rank that
        # did not exist when it was saved (a larger group) finds them there too; RNGs are per rank
        loaders = [loader.state_dict() for loader in self._loaders]
        if holds_dtensors(state):  # through DCP, where a list of dicts would need a template: one value
            loaders = json.dumps(loaders)
        checkpointer.save(done, model=_State({"state": plain(state), "loaders": loaders}), optimizer=None,
                          sampler_state={"steps_done": done}, log=self._services.sender)
        self._services.sender.flush()  # what a restore will not replay must reach the store now
        health.phase = phase
        if stop:
            self._stopped(done)
        return True

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
        and optimizers in `into` are loaded from it."""
        loaded = self._services.loaded
        if loaded is None:
            self._restored = True
            return None
        if into is not None and not isinstance(into, dict):
            raise UserError(f"ctx.restore: into= must be a dict shaped like the state given to ctx.save, "
                            f"got {type(into).__name__}")
        state = self._read_sharded(loaded, into) if loaded.sharded else self._read_replicated(loaded, into)
        self._restored = True
        if loaded.rank_state is not None:
            set_rng_state(loaded.rank_state["rng"])
        else:  # a rank that did not exist when it was saved: seeded by run, rank and step instead
            torch.manual_seed(self.config.run.seed * 1000 + self.rank + 1 + loaded.step * 7919)
        for i, loader in enumerate(self._loaders):
            self._restore_loader(i, loader)
        return state

    def _read_replicated(self, loaded, into: dict | None) -> dict:
        if not isinstance(loaded.model, dict) or "state" not in loaded.model:
            raise UserError(f"checkpoint of step {loaded.step} holds no state saved by ctx.save (was it made by "
                            "another entrypoint?)")
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
        if "model.loaders" not in sharded_keys(loaded):  # ctx.save writes {"state": ..., "loaders": ...}
            raise UserError(f"checkpoint of step {loaded.step} holds no state saved by ctx.save (was it made by "
                            "another entrypoint?)")
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
        watchdog's sign of progress."""
        values = {}
        for k, v in metrics.items():
            values[k] = float(v.item() if isinstance(v, torch.Tensor) else v)
        self._services.sender.log(values, step=int(step))
        health = self._services.health
        if step > self.last_step:
            health.step, self.last_step = int(step), int(step)
            health.progress += 1
        if "train/loss" in values or "loss" in values:
            loss = values.get("train/loss", values.get("loss"))
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
