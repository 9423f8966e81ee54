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
                loss, metrics = algorithm_loss(...)      # metrics: tensors on the device, never read here
                if run.record_loss(loss):
                    accelerator.backward(loss)
                run.optimizer_step(optimizer, lr_scheduler, params)
            if run.end_of_step(**metrics):  # an optimizer step completed: logged on schedule, checkpointed
                ...validation every N steps...
        run.finish()

    Non-finite losses void their accumulation window (no update) and abort the run after
    --max_nonfinite_steps in a row. SIGTERM/SIGINT (preemption, Ctrl-C) make every rank save a
    checkpoint at the next step boundary and exit with code 0; a second Ctrl-C stops at once.
    The host waits for the GPU once per optimizer step (is the window's loss finite on every rank,
    and should the run stop) and once per --logging_steps (the metrics, averaged on the device).
    """

    def __init__(self, accelerator, args, loader, max_steps, num_epochs, global_step):
        from tqdm.auto import tqdm

        self.acc, self.args, self.loader = accelerator, args, loader
        self.max_steps, self.num_epochs, self.global_step = max_steps, num_epochs, global_step
        self.start_step = global_step
        self.bar = tqdm(total=max_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process)
        self.window_finite, self.nonfinite_in_a_row, self.nonfinite_total = True, 0, 0
        self.window_skipped, self.skipped_total = False, 0
        # on the device, read once at the window's optimizer step: a non-finite loss, a skip (skip_batch)
        self.window_bad = self.window_skip = None
        self.sums, self.last, self.lr = {}, {}, 0.0  # metrics since the last log: (sum, count) on the device; numbers
        self.signal, self.stop = None, False
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
    def deepspeed(self):
        return getattr(self.acc, "deepspeed_engine_wrapped", None) is not None

    @property
    def window_void(self):
        """This accumulation window gets no update (a non-finite loss or a skipped batch in it)."""
        return not self.window_finite or self.window_skipped

    def record_loss(self, loss):
        """Note `loss` (for the log and for the window's finiteness, on the device) and say whether to
        backpropagate it: True, except in a window already voided by skip_batch. A non-finite loss is
        backpropagated too, so every rank calls backward alike without asking the others first; its
        window gets no update (decided at the optimizer step). Under DeepSpeed, which updates inside
        the window's last backward, a non-finite loss is found here (a host read per micro-batch) and
        the rest of its window is not backpropagated."""
        if self.window_void:  # the same on every rank, so no collective is needed to agree
            return False
        value = loss.detach().float()
        finite = torch.isfinite(value)
        if self.deepspeed:
            if self._any_rank(not finite.all().item()):
                self.window_finite = False
                return False
        else:
            self.window_bad = ~finite if self.window_bad is None else self.window_bad | ~finite
        logged = finite if self.window_skip is None else finite & ~self.window_skip  # a skipped batch's loss is not logged
        self._add("loss", (torch.where(logged, value, 0.0), logged.float()))
        return True

    def _add(self, name, value):
        """A metric of this micro-batch: a tensor (averaged over the calls), a (sum, count) pair of
        tensors (summed, then divided), or a number (the last one is logged)."""
        if isinstance(value, tuple):
            total, count = value
        elif torch.is_tensor(value):
            total, count = value.detach().float().mean(), 1.0
        else:
            self.last[name] = value
            return
        total = total.detach().float()
        count = count.detach().float() if torch.is_tensor(count) else torch.full((), float(count), device=total.device)
        if name in self.sums:
            self.sums[name][0] += total
            self.sums[name][1] += count
        else:
            self.sums[name] = [total.clone(), count.clone()]

    def skip_batch(self, condition=True):
        """Void this accumulation window without calling it non-finite (e.g. a reward-weighted batch
        whose weights are all zero): no update, counted as skipped_steps. `condition`: True, or a bool
        tensor on the device, decided from values every rank shares (a gathered batch) so all ranks
        skip alike; a tensor is read with the window's other flags at its optimizer step (its batches
        are still backpropagated, their gradients dropped), except under DeepSpeed, which updates inside
        the last backward: there it is read at once and the window's later batches are not run."""
        if torch.is_tensor(condition) and not self.deepspeed:
            self.window_skip = condition if self.window_skip is None else self.window_skip | condition
            return
        if bool(condition.item() if torch.is_tensor(condition) else condition):
            self.window_skipped = True

    def optimizer_step(self, optimizer, lr_scheduler, params, ema=None):
        """Clip (a list of params, so clipping sees all of them) and step at accumulation
        boundaries, then the EMA of `params` if one is kept (before end_of_step checkpoints, so a
        checkpoint holds the EMA of its own step); a window with a non-finite loss is discarded.
        At the boundary the host reads, once, whether any rank's window had a non-finite loss and
        whether any rank was asked to stop."""
        self.lr = optimizer.param_groups[0]["lr"]  # the lr this step used
        if self.acc.sync_gradients:
            self._agree_at_boundary()
            if self.window_void and self.deepspeed:
                self._void_deepspeed_window(params, lr_scheduler)
        if self.acc.sync_gradients and not self.window_void:
            if self.args.max_grad_norm > 0:
                self.acc.clip_grad_norm_(params, self.args.max_grad_norm)
            optimizer.step()
            if ema is not None:
                ema.step(params)
        lr_scheduler.step()  # every step, so the lr stays a function of global_step
        optimizer.zero_grad(set_to_none=True)

    def _agree_at_boundary(self):
        """One read for the window: a non-finite loss or a skip on any rank (flags kept on the device
        by record_loss and skip_batch) and a stop signal on any rank, reduced together."""
        device = self.acc.device
        flags = [self.window_bad, self.window_skip]
        if self.acc.num_processes == 1:
            if any(f is not None for f in flags):
                bad, skip = torch.stack([(f if f is not None else torch.zeros((), dtype=torch.bool, device=device)).float()
                                         for f in flags]).tolist()
                self.window_skipped = self.window_skipped or bool(skip)
                self.window_finite = self.window_finite and not (bad and not self.window_skipped)  # skipped: not counted
            self.stop = self.signal is not None
            return
        stacked = torch.stack([(f if f is not None else torch.zeros((), dtype=torch.bool, device=device)).float() for f in flags]
                              + [torch.full((), 1.0 if self.signal is not None else 0.0, device=device)])
        bad, skip, stop = (self.acc.reduce(stacked, "max") > 0).tolist()
        self.window_skipped = self.window_skipped or skip
        self.window_finite = self.window_finite and not (bad and not self.window_skipped)
        self.stop = stop

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
        """After each micro-batch, with its metrics (see _add): returns True when an optimizer step
        completed, after logging (every --logging_steps, and at the last step, a checkpoint or a stop),
        checkpointing on schedule, and handling non-finite streaks and stop signals."""
        for name, value in metrics.items():
            self._add(name, value)
        if not self.acc.sync_gradients:
            return False
        self.global_step += 1
        if self.window_skipped:
            self.skipped_total += 1
        if self.window_finite and not self.window_skipped:
            self.nonfinite_in_a_row = 0
        elif not self.window_finite:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            logger.warning("step %d: non-finite loss, update skipped (%d in a row)", self.global_step, self.nonfinite_in_a_row)
        self.bar.update(1)
        self.window_finite, self.window_skipped, self.window_bad, self.window_skip = True, False, None, None
        # one process: a signal that came after the boundary's read still stops at this step (no read needed)
        stop = self.stop or (self.acc.num_processes == 1 and self.signal is not None)
        abort = self.nonfinite_in_a_row >= self.args.max_nonfinite_steps
        checkpoint_now = stop or (self.args.checkpointing_steps and self.global_step % self.args.checkpointing_steps == 0)
        if stop or abort or checkpoint_now or self.global_step >= self.max_steps or \
                self.global_step % getattr(self.args, "logging_steps", 1) == 0:
            self.log()
        if abort:
            found = checkpoint.list_checkpoints(self.args.output_dir)
            self.finish()
            raise UserError(f"the loss was not finite for {self.nonfinite_in_a_row} steps in a row (up to step "
                            f"{self.global_step}); stopping. Lower --learning_rate, try --mixed_precision bf16 or check "
                            f"the data. Last checkpoint: {found[-1] if found else 'none'}")
        if checkpoint_now:
            checkpoint.save_checkpoint(self.acc, self.args, self.global_step, self.mid_epoch_state)
        if stop:
            self.finish()
            self.acc.end_training()
            logger.warning("stopped by a signal at step %d; continue with --resume_from_checkpoint latest", self.global_step)
            sys.exit(0)
        return True

    def log(self):
        """Log the metrics since the last log: the means over the micro-batches of every rank (one
        reduction and one read for all of them), the last value of plain numbers, the counters and lr."""
        logs = dict(self.last)
        names = sorted(self.sums)
        if names:
            stacked = torch.stack([v for n in names for v in self.sums[n]])
            if self.acc.num_processes > 1:
                stacked = self.acc.reduce(stacked, "sum")
            values = stacked.tolist()
            logs.update({n: values[2 * i] / values[2 * i + 1] for i, n in enumerate(names) if values[2 * i + 1] > 0})
        logs["nonfinite_steps"], logs["skipped_steps"], logs["lr"] = self.nonfinite_total, self.skipped_total, self.lr
        self.acc.log(logs, step=self.global_step)
        if "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
        self.sums, self.last = {}, {}
        return logs

    def finish(self):
        """Close the bar and restore the signal handlers (idempotent). A run that reached its last step
        with every step's loss non-finite trained nothing: it fails here, before its untouched start
        could be saved as the final model (every rank alike: the counts are agreed at each step)."""
        self.bar.close()
        self._restore_signals()
        ran = self.global_step - self.start_step
        if self.global_step >= self.max_steps and ran > 0 and self.nonfinite_total == ran:
            self.start_step = self.global_step  # said once
            raise UserError(f"the loss was not finite at any of the {ran} steps of this run (steps {self.global_step - ran + 1}-"
                            f"{self.global_step}), so nothing was trained and no final model is saved. Lower --learning_rate, "
                            "try --mixed_precision bf16 or check the data")


def _restore_handlers(old):
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        for s, h in old.items():
            signal.signal(s, h)
