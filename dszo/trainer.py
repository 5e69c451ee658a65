"""The training loop. `Trainer.train` reads top to bottom: a step, then the calls that log it, watch its health,
evaluate, honour a stop request and checkpoint. The run itself is built by dszo/assembly.py; what it writes is
dszo/outputs.py's; checkpoints go through the parts' state_dict / load_state_dict (dszo/checkpoint.py).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from dszo import checkpoint, comm
from dszo.assembly import build_run
from dszo.best import BestModel
from dszo.config import ConfigError, TrainConfig, to_dict
from dszo.data import StepSampler
from dszo.directions import step_seed
from dszo.evaluate import evaluate, headline
from dszo.metrics import MetricsWriter, peak_rss_mb, read_metrics
from dszo.optim import lr_at
from dszo.outputs import prepare_output_dir, save_trained, write_results
from dszo.replay import FORMAT as REPLAY_FORMAT, ReplayLog
from dszo.zero import quantized_bytes

EXIT_DIVERGED = 3      # too many non-finite losses in a row (a checkpoint was saved)
EXIT_STOPPED = 143     # 128 + SIGTERM: stopped by a signal after saving a checkpoint; resume to continue


class TrainingStopped(RuntimeError):
    """The run stopped before max_steps (a signal, or too many non-finite losses), after saving a checkpoint."""

    def __init__(self, msg: str, code: int, together: bool = True) -> None:
        super().__init__(msg)
        self.code = code
        self.together = together   # every rank stops at the same step (False: this rank alone, during set-up)


def _stopped_during_setup(cfg: TrainConfig):
    """What a signal during set-up raises: nothing new to save, and the way to start again."""
    again = ("run the same command again" if cfg.resume_from_checkpoint else
             "run the same command again with --overwrite_output_dir true (this attempt wrote its config.yaml)")
    return lambda: TrainingStopped(f"stopped by a signal during set-up, before any step of this attempt: nothing new "
                                   f"to save; {again}", EXIT_STOPPED, together=False)


def direction_layout(cfg: TrainConfig, global_batch: int) -> tuple[list[int], int, int]:
    """This rank's direction slots, its position among the ranks sharing them and their number (comm.direction_slots),
    with the global batch checked to split into whole per-rank micro-batches."""
    groups, accum = cfg.direction_groups, cfg.gradient_accumulation_steps
    try:
        slots, position, sharing = comm.direction_slots(groups)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if global_batch % (groups * sharing * accum):
        raise ConfigError(f"direction_groups = {groups}: the global batch of {global_batch} examples must split into "
                          f"{groups} parts, each over {sharing} rank(s) in {accum} micro-batch(es); set "
                          "per_device_train_batch_size so that it does")
    return slots, position, sharing


def resume_point(cfg: TrainConfig) -> Optional[tuple[Path, dict]]:
    """(checkpoint folder, its metadata) for resume_from_checkpoint, checked against this run; or None."""
    if not cfg.resume_from_checkpoint:
        return None
    if not cfg.method.capabilities().resumable:
        raise ConfigError(f"{cfg.method.name} runs cannot be resumed: their optimiser state lives in DeepSpeed's "
                          "training engine, which dszo's checkpoints do not hold")
    path = checkpoint.resolve(Path(cfg.output_dir), cfg.resume_from_checkpoint)
    meta = checkpoint.read_meta(path)
    checkpoint.check_compatible(meta, to_dict(cfg), comm.world_size(), path)
    return path, meta


class Trainer:
    """One training run: set up in __init__ (output folder, the built run, a restored checkpoint), then `train()`.
    Its own checkpointed state (run seed, config, data position) goes through state_dict / load_state_dict."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.started = cfg, time.perf_counter()
        comm.STOP.raise_on_signal(_stopped_during_setup(cfg))   # until install_handlers below
        self.run_seed = comm.broadcast_int(cfg.seed)  # rank 0's seed is the run's seed
        torch.manual_seed(self.run_seed)
        resume = resume_point(cfg)
        self.out = prepare_output_dir(cfg, resume_step=resume[1]["step"] if resume else 0)
        self.main = comm.is_main()
        self.metrics = MetricsWriter(self.out, cfg.report_to, enabled=self.main)
        self.run = build_run(cfg, self.run_seed, calibrate=resume is None)
        self.method, self.runtime, self.data = self.run.method, self.run.runtime, self.run.data
        global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * comm.world_size()
        self.sampler = StepSampler(len(self.run.train_split), global_batch, self.run_seed)
        self.slots, self.position, self.sharing = direction_layout(cfg, global_batch)
        self.start_step = self.completed_steps = 0
        self.best = BestModel(cfg.metric_for_best_model, cfg.greater_is_better) if cfg.load_best_model_at_end else None
        self.saved_at: Optional[int] = None
        tic = time.perf_counter()
        if resume:
            checkpoint.restore(*resume, self.method, self)
        self.run.timings["restore_s"] = time.perf_counter() - tic
        self.replay = ReplayLog(self.out, {"format": REPLAY_FORMAT, "run_seed": self.run_seed, "method": cfg.method.name,
                                           "config": to_dict(cfg)}, self.start_step,
                                enabled=self.main and cfg.replay_log and self.method.capabilities.zeroth_order)
        comm.STOP.install_handlers()
        self.dev = self.data.eval_split("dev")
        self.test = self.data.eval_split("test") if cfg.do_predict or cfg.test_eval_steps else None
        self.step_times: list[float] = []
        self.bad_in_a_row = self.skipped = 0
        self._log_setup()

    # -- the loop --------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        before = self.evaluate(0) if cfg.eval_before_training and self.start_step == 0 else self._logged_start_eval()
        if cfg.test_eval_steps and cfg.eval_before_training and self.start_step == 0:
            self.evaluate(0, self.test, "test")
        if self.main and before:
            tqdm.write(f"[dszo] dev {headline(before)} before training (n={before['num_examples']})")
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, disable=not self.main or cfg.disable_tqdm,
                   desc=cfg.method.name, dynamic_ncols=True)
        for t in range(self.start_step, cfg.max_steps):
            record, batches, comm_before = self.train_step(t)
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.4f}")
            self.log_step(t, record, batches, comm_before)
            self.stop_if_diverged(t + 1, record)
            if cfg.eval_steps and (t + 1) % cfg.eval_steps == 0 and t + 1 != cfg.max_steps:
                self.keep_if_best(t + 1, self.evaluate(t + 1))
            if cfg.test_eval_steps and (t + 1) % cfg.test_eval_steps == 0 and t + 1 != cfg.max_steps:
                self.evaluate(t + 1, self.test, "test")
            self.stop_if_requested(t + 1)
            if cfg.save_steps and (t + 1) % cfg.save_steps == 0 and self.saved_at != t + 1:
                self.save(t + 1)
        bar.close()
        self.replay.close()
        return self.finish(before)

    def train_step(self, t: int):
        """One step of the method over this rank's micro-batches; (its record, the batches, the comm counter)."""
        cfg, tic = self.cfg, time.perf_counter()
        comm_before = comm.COUNTER.snapshot() if comm.COUNTER else None
        groups, accum = cfg.direction_groups, cfg.gradient_accumulation_steps
        batches = [replace(self.run.train_split.batch(idx), slot=k) for k in self.slots
                   for idx in self.sampler.slot_micro_batches(t, groups, k, self.position, self.sharing, accum)]
        lr = lr_at(t, cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.max_steps)
        record = self.method.step(t, batches, lr, self.runtime)
        self.step_times.append(time.perf_counter() - tic)
        self.completed_steps = t + 1
        self.replay.append(t + 1, step_seed(self.run_seed, t), record)
        self.bad_in_a_row, self.skipped = ((self.bad_in_a_row + 1, self.skipped + 1) if record.skipped
                                           else (0, self.skipped))
        return record, batches, comm_before

    # -- what the loop calls ---------------------------------------------------------------------------------
    def log_step(self, t: int, record, batches: list, comm_before: Optional[dict]) -> None:
        cfg = self.cfg
        if not ((t + 1) % max(1, cfg.logging_steps) == 0 or t == self.start_step or t + 1 == cfg.max_steps
                or record.skipped):
            return
        line = {"step": t + 1, **record.metrics(), "step_s": self.step_times[-1],
                "tokens_local": int(sum(int(b.token_mask().sum()) for b in batches)), "skipped": record.skipped,
                "skipped_total": self.skipped, **{f"{k}_s": v for k, v in record.timings.items()}}
        if comm_before is not None:
            line["comm"] = comm.CommCounter.delta(comm_before, comm.COUNTER.snapshot())
        if cfg.log_memory:
            line["peak_rss_mb"] = peak_rss_mb()
        self.metrics.log(line)

    def stop_if_diverged(self, step: int, record) -> None:
        if self.cfg.max_bad_steps and self.bad_in_a_row >= self.cfg.max_bad_steps:
            path = self.save(step)
            raise TrainingStopped(f"{self.bad_in_a_row} steps in a row had a non-finite loss (last: "
                                  f"{record.describe_bad()}); stopped at step {step} with a checkpoint in {path}. "
                                  "Lower learning_rate or method.zo_eps, or check the data", EXIT_DIVERGED)

    def stop_if_requested(self, step: int) -> None:
        if comm.STOP.agreed and step != self.cfg.max_steps:
            path = self.save(step)
            raise TrainingStopped(f"stopped by a signal after step {step}; checkpoint in {path}. Continue with "
                                  "--resume_from_checkpoint latest", EXIT_STOPPED)

    def _logged_start_eval(self) -> Optional[dict]:
        """A resumed run's dev evaluation before training, as the interrupted attempt logged it (main rank: the
        summary's dev_*_before then describe the whole run, not only its last attempt)."""
        if not self.main or self.start_step == 0:
            return None
        for r in read_metrics(self.out):
            if r.get("event") == "eval" and r.get("step") == 0:
                return {k.removeprefix("eval_"): v for k, v in r.items() if k.startswith("eval_") and k != "eval_s"}
        return None

    def evaluate(self, step: int, split=None, prefix: str = "eval", model_step: Optional[int] = None) -> dict:
        """model_step: the step of the model evaluated where it is not `step` (the dev-best one, loaded back)."""
        split = self.dev if split is None else split
        res = evaluate(self.runtime, split, self.cfg.per_device_eval_batch_size, self.data.generation)
        loaded = {"model_step": model_step} if model_step not in (None, step) else {}
        self.metrics.log({"event": prefix, "step": step, **loaded,
                          **{f"{prefix}_s" if k == "eval_s" else f"{prefix}_{k}": v for k, v in res.items()}})
        return res

    def keep_if_best(self, step: int, result: dict) -> None:
        """load_best_model_at_end: a dev evaluation better than the earlier ones is saved (and kept from pruning)."""
        if self.best is not None and self.best.improves(result):
            self.best.keep(step, result)
            self.save(step)

    def load_best(self, last: dict) -> tuple[dict, dict]:
        """At max_steps: the kept model's dev result (this one's, if it is the best) and results.json's fields."""
        step = self.cfg.max_steps
        saved = None if self.best.step is None else checkpoint.step_dir(self.out, self.best.step)
        # every rank decides alike: a rank that could not find the folder tells the others
        missing = saved is not None and comm.all_max_int(int(not (saved / "meta.json").is_file()))
        if missing and self.main:
            tqdm.write(f"[dszo] warning: the dev-best model's checkpoint {saved} is gone (a resume from a checkpoint "
                       "older than the latest one, after it was pruned): keeping the last step's model")
        if saved is None or missing or self.best.improves(last):   # None: no finite evaluation before the last
            self.best.keep(step, last)
        else:
            checkpoint.restore_method(saved, self.method)
            if self.main:
                tqdm.write(f"[dszo] loaded the dev-best model, step {self.best.step} of {step} "
                           f"({self.best.metric} {self.best.value:.4f})")
        return self.best.result, self.best.summary(step, last)

    def save(self, step: int) -> Path:
        if self.saved_at == step:   # e.g. a new dev-best model, then a stop request after the same step
            return checkpoint.step_dir(self.out, step)
        tic = time.perf_counter()
        self.saved_at = step
        path = checkpoint.save(self.out, step, self.method, self, self.cfg.save_total_limit)
        self.metrics.log({"event": "checkpoint", "step": step, "path": str(path), "save_s": time.perf_counter() - tic})
        return path

    # -- checkpointed state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"run_seed": self.run_seed, "config": to_dict(self.cfg),
                "data": {"next_step": self.completed_steps, "global_batch": self.sampler.global_batch},
                **({"best_model": self.best.state_dict()} if self.best else {})}

    def load_state_dict(self, meta: dict) -> None:
        self.start_step = self.completed_steps = int(meta["step"])
        if self.best is not None:
            self.best.load_state_dict(meta.get("best_model"))

    # -- set-up and end --------------------------------------------------------------------------------------
    def _log_setup(self) -> None:
        method, data = self.method, self.data
        self.metrics.log({
            "event": "setup", "world_size": comm.world_size(), "threads": torch.get_num_threads(),
            "setup_s": time.perf_counter() - self.started, **self.run.timings, "peak_rss_mb": peak_rss_mb(),
            "trainable_elements_local": sum(p.local.numel() for p in method.partitions.values()),
            "task": data.task.name, "train_examples": len(self.run.train_split), "dev_examples": len(self.dev),
            "test_examples": len(data.parts["test"]), "frozen_1d": method.frozen_1d,
            "resumed_from_step": self.start_step, "quantization": self.cfg.model.quantization,
            **quantized_bytes(self.runtime.engine.module), **method.setup_metrics()})
        if self.main and method.frozen_1d:
            frozen = method.frozen_1d
            tqdm.write(f"[dszo] {len(frozen)} 1-D tensors stay frozen (no functional perturbation for their "
                       f"module): {', '.join(frozen[:5])}{' ...' if len(frozen) > 5 else ''}")

    def finish(self, before: Optional[dict]) -> dict:
        """Final evaluation(s), the trained tensors, the summary line and results.json."""
        cfg = self.cfg
        after, kept = self.evaluate(cfg.max_steps), {}
        if self.best is not None:
            after, kept = self.load_best(after)
        kept_step = kept.get("best_model_step", cfg.max_steps)
        test = (self.evaluate(cfg.max_steps, self.test, "test", model_step=kept_step)
                if cfg.do_predict or cfg.test_eval_steps else None)
        save_trained(self.method, self.out, cfg, kept_step)
        steady = self.step_times[1:] or self.step_times
        summary = {"event": "end", **{f"dev_{k}_before": v for k, v in (before or {}).items() if k != "eval_s"},
                   **{f"dev_{k}_after": v for k, v in after.items() if k != "eval_s"},
                   **{f"test_{k}": v for k, v in (test or {}).items()}, "steps": cfg.max_steps,
                   "resumed_from_step": self.start_step, "skipped_steps": self.skipped, **kept,
                   "mean_step_s": sum(steady) / len(steady) if steady else None, "world_size": comm.world_size(),
                   "wall_s": time.perf_counter() - self.started, "peak_rss_mb": peak_rss_mb()}
        self.metrics.log(summary)
        self.metrics.close()
        if self.main:
            write_results(self.out, summary)
            tqdm.write(f"[dszo] dev {headline(after, before)} after {cfg.max_steps} steps"
                       + (f" (the dev-best model, step {kept_step})" if kept_step != cfg.max_steps else "")
                       + (f"; test {headline(test)}" if test else "") + f"; outputs in {self.out}")
        return summary
