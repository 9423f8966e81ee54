"""TrainingRun: the bookkeeping every training loop shares (accumulation windows, skipped and void
steps, clipping, EMA, logging, checkpoint cadence, SIGTERM), so a script keeps only its algorithm.
"""
import logging
import signal
import sys
import threading
import weakref

import torch

from myutils.data import to_device
from myutils.errors import UserError

from . import checkpoint, prepare

logger = logging.getLogger("rorem")


class TrainingRun:
    """The bookkeeping every training loop shares, so a script keeps only its algorithm:

        run = TrainingRun(accelerator, args, loader, max_steps, num_epochs, global_step)
        for batch in run.batches():
            with accelerator.accumulate(model):
                loss = algorithm_loss(...)
                if run.loss_is_finite(loss):
                    accelerator.backward(loss)
                run.optimizer_step(optimizer, lr_scheduler, params)
            if run.end_of_step():          # an optimizer step completed: logged, checkpointed
                ...validation every N steps...
        run.finish()

    Non-finite losses void their accumulation window (no update) and abort the run after
    --max_nonfinite_steps in a row. SIGTERM/SIGINT (preemption, Ctrl-C) make every rank save a
    checkpoint at the next step boundary and exit with code 0; a second Ctrl-C stops at once.
    """

    def __init__(self, accelerator, args, loader, max_steps, num_epochs, global_step):
        from tqdm.auto import tqdm

        self.acc, self.args, self.loader = accelerator, args, loader
        self.max_steps, self.num_epochs, self.global_step = max_steps, num_epochs, global_step
        self.bar = tqdm(total=max_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process)
        self.window_finite, self.nonfinite_in_a_row, self.nonfinite_total = True, 0, 0
        self.window_skipped, self.skipped_total = False, 0
        self.loss_sum, self.loss_count, self.lr = 0.0, 0, 0.0
        self.signal = None
        self.mid_epoch_state = None  # RL: callable(folder) saving the current epoch's samples with a checkpoint
        # the handler holds the run weakly and the handlers come back when the run is finished or
        # collected: a script that dies mid-step must not leave its model alive in the process
        ref = weakref.ref(self)

        def on_signal(signum, frame):
            run = ref()
            if run is not None:
                run._on_signal(signum, frame)
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self._restore_signals = weakref.finalize(self, _restore_handlers, old)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum
        logger.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)

    def batches(self):
        """Batches on the device, from where global_step left off, until max_steps. However the loop
        ends (finished, an error in the step body, which reaches here as GeneratorExit, a broken file
        met by the loader), the bar is closed and the signal handlers are given back."""
        try:
            if self.global_step >= self.max_steps:
                return
            for _, batch in prepare.epoch_batches(self.loader, self.global_step, self.args.gradient_accumulation_steps, self.num_epochs):
                yield to_device(batch, self.acc.device)
                if self.global_step >= self.max_steps:
                    return
        finally:
            self.finish()

    def _any_rank(self, flag):
        if self.acc.num_processes == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, "max").item() > 0)

    @property
    def window_void(self):
        """This accumulation window gets no update (a non-finite loss or a skipped batch in it)."""
        return not self.window_finite or self.window_skipped

    def loss_is_finite(self, loss):
        """False on every rank if the loss is NaN/inf on any rank (then nobody calls backward, so
        no rank waits for a gradient all-reduce the others skip); the window gets no update.
        Also False for the rest of a window already void: its gradients would be dropped anyway
        (and under DeepSpeed a backward at the window's end would apply them)."""
        if self.window_void:  # the same on every rank, so no collective is needed to agree
            return False
        bad = self._any_rank(not torch.isfinite(loss.detach()).all().item())
        if bad:
            self.window_finite = False
        else:
            self.loss_sum += loss.detach().float()
            self.loss_count += 1
        return not bad

    def skip_batch(self):
        """Void this accumulation window without calling it non-finite (e.g. a reward-weighted batch
        whose weights are all zero): no backward, no update, counted as skipped_steps. Decide it from
        values every rank shares (a gathered batch), so all ranks skip alike."""
        self.window_skipped = True

    def optimizer_step(self, optimizer, lr_scheduler, params, ema=None):
        """Clip (a list of params, so clipping sees all of them) and step at accumulation
        boundaries, then the EMA of `params` if one is kept (before end_of_step checkpoints, so a
        checkpoint holds the EMA of its own step); a window with a non-finite loss is discarded."""
        self.lr = optimizer.param_groups[0]["lr"]  # the lr this step used
        if self.acc.sync_gradients and self.window_void and getattr(self.acc, "deepspeed_engine_wrapped", None):
            self._void_deepspeed_window(params, lr_scheduler)
        if self.acc.sync_gradients and not self.window_void:
            if self.args.max_grad_norm > 0:
                self.acc.clip_grad_norm_(params, self.args.max_grad_norm)
            optimizer.step()
            if ema is not None:
                ema.step(params)
        lr_scheduler.step()  # every step, so the lr stays a function of global_step
        optimizer.zero_grad(set_to_none=True)

    def _void_deepspeed_window(self, params, lr_scheduler):
        """DeepSpeed updates inside backward and keeps its own gradient buffers: skipping the
        window's last backward would leave the earlier micro-batches' gradients to leak into the next
        window, and a backward there would update from part of this one. So end a void window with a
        NaN gradient on one weight: ZeRO's overflow check then drops the whole window's gradients and
        skips the update, as it does for an fp16 overflow (under fp16 it also halves the loss scale,
        which grows back). The engine does not step the lr schedule on a skipped update; step it here
        so the lr stays a function of global_step, as without DeepSpeed."""
        self.acc.backward(params[0].reshape(-1)[:1].sum() * float("nan"))
        if self.acc.deepspeed_engine_wrapped.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update from a window it had to skip (NaN gradients): "
                               "use ZeRO stage 1 or 2 with its gradient-norm check on")
        lr_scheduler.scheduler.step()

    def end_of_step(self, **metrics):
        """After each micro-batch: returns True when an optimizer step completed, after logging it,
        checkpointing on schedule, and handling non-finite streaks and stop signals."""
        if not self.acc.sync_gradients:
            return False
        self.global_step += 1
        logs = dict(metrics)
        if self.window_skipped:
            self.skipped_total += 1
        if self.window_finite and not self.window_skipped:
            self.nonfinite_in_a_row = 0
            logs["loss"] = self.acc.reduce(self.loss_sum / max(1, self.loss_count), "mean").item()
        elif not self.window_finite:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            logger.warning("step %d: non-finite loss, update skipped (%d in a row)", self.global_step, self.nonfinite_in_a_row)
        logs["nonfinite_steps"], logs["skipped_steps"] = self.nonfinite_total, self.skipped_total
        logs["lr"] = self.lr
        self.acc.log(logs, step=self.global_step)
        self.bar.update(1)
        if "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
        self.window_finite, self.window_skipped, self.loss_sum, self.loss_count = True, False, 0.0, 0
        if self.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            found = checkpoint.list_checkpoints(self.args.output_dir)
            self.finish()
            raise UserError(f"the loss was not finite for {self.nonfinite_in_a_row} steps in a row (up to step "
                            f"{self.global_step}); stopping. Lower --learning_rate, try --mixed_precision bf16 or check "
                            f"the data. Last checkpoint: {found[-1] if found else 'none'}")
        stop = self._any_rank(self.signal is not None)
        if stop or (self.args.checkpointing_steps and self.global_step % self.args.checkpointing_steps == 0):
            checkpoint.save_checkpoint(self.acc, self.args, self.global_step, self.mid_epoch_state)
        if stop:
            self.finish()
            self.acc.end_training()
            logger.warning("stopped by a signal at step %d; continue with --resume_from_checkpoint latest", self.global_step)
            sys.exit(0)
        return True

    def finish(self):
        """Close the bar and restore the signal handlers (idempotent)."""
        self.bar.close()
        self._restore_signals()


def _restore_handlers(old):
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        for s, h in old.items():
            signal.signal(s, h)
