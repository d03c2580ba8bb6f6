"""`fastgpt pretrain`: GPT-1 pretraining from raw text, on one CPU, one GPU, or many through torchrun.

One update ("step") = grad_accum micro-batches per rank, each (batch_size, block_size) tokens; the loss is the mean
next-token cross-entropy over the global batch. Exact resumption rests on four things being restored: the weights,
the optimizer/scheduler/scaler states, each rank's RNG states (dropout masks), and the sampler position (the data);
sampling and evaluation never touch the training RNG (they run under `torch.random.fork_rng`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..data import BatchSampler, prepare_data, validation_batches
from ..data.tokenizer import prompt_ids
from . import checkpoint as ckpt_io
from . import distributed as dist_utils
from .config import RESUMABLE, PretrainConfig
from .metrics import MetricsLog, flops_per_token, peak_flops, plot_loss_curve
from .schedule import make_optimizer, make_scheduler, parameter_dims


def build_model(config: PretrainConfig, vocab_size: int):
    """The GPT-1 of fastgpt.models with this run's sizes; returns (model, model_config_dict)."""
    from ..models import GPT1, GPT1Config

    model_config = GPT1Config(
        vocab_size=vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=4 * config.n_embd,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
    )
    return GPT1(model_config), dataclasses.asdict(model_config)


def model_logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def next_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # inputs and targets are already offset by one token (the sampler cuts blocks of block_size + 1), so every
    # position has a target; the loss is computed here in fp32 from the logits, whatever the autocast dtype.
    logits = model_logits(model(inputs))  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def autocast_dtype(config: PretrainConfig, device: torch.device) -> torch.dtype:
    if config.precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def backend_context(name: str | None, device: torch.device):
    """Every fastgpt op on backend --backend `name` (None: each op's own choice), refused up front, naming the flag,
    when that backend cannot run on `device` here: inside, its ops would fall back to the reference one by one, or
    fail with a RuntimeError mid-run."""
    if name is None:
        return contextlib.nullcontext()
    import fastgpt

    if name not in fastgpt.BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(fastgpt.BACKENDS)}, got {name!r}")
    available = fastgpt.available_backends(device)
    if name not in available:
        raise ValueError(f"--backend {name} cannot run on {device.type} on this machine (here: {', '.join(available)})")
    return fastgpt.use_backend(name)


def perplexity(loss: float) -> float:
    """exp(loss); inf past a float's range (a diverging run's loss of hundreds), where math.exp raises."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def evaluate(model, val_tokens, config: PretrainConfig, info, amp_dtype) -> float:
    model.eval()
    total = torch.zeros(2, device=info.device)  # (sum of batch losses, number of batches)
    for inputs, targets in validation_batches(val_tokens, config.block_size, config.batch_size, config.eval_batches,
                                              info.rank, info.world_size):
        with autocast(info.device, amp_dtype):
            total[0] += next_token_loss(model, inputs.to(info.device), targets.to(info.device))
        total[1] += 1
    if info.distributed:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def generate_samples(model, tokenizer, prompts, max_new_tokens, device, amp_dtype, seed=0) -> list[str]:
    """Continuations of fixed prompts (top-k 40, temperature 0.8) from a fixed seed, without disturbing the RNG."""
    was_training = model.training
    model.eval()
    texts = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)], dtype=torch.long, device=device)
            with autocast(device, amp_dtype):
                out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40)
            texts.append(tokenizer.decode(out[0].tolist()))
    model.train(was_training)
    return texts


class Run:
    """Everything one pretraining run holds; `train()` does the work."""

    def __init__(self, config: PretrainConfig, resume: str | None = None, log=print):
        self.config = config
        self.info = dist_utils.setup(config.device)
        self.log = log if self.info.is_main else (lambda *a, **k: None)
        self.resume = resume

    # -- set-up -----------------------------------------------------------------------------------------------
    def _prepare(self):
        c, info = self.config, self.info
        if c.fsdp and info.device.type != "cuda":
            raise dist_utils.LaunchError("--fsdp needs CUDA GPUs (PyTorch's FSDP does not run on CPU): drop --fsdp, "
                                         "torchrun on CPU runs DDP over gloo")
        if c.fsdp and not info.distributed:
            raise dist_utils.LaunchError("--fsdp shards the model across ranks: launch with torchrun --nproc_per_node=N")
        resume_meta, resume_weights, resume_state = None, None, None
        self.resume_from = ckpt_io.find_checkpoint(self.resume) if self.resume else None
        if self.resume_from is not None:
            resume_meta, resume_weights, resume_state = ckpt_io.load_checkpoint(self.resume_from)
            ckpt_io.require_kind(resume_meta, self.resume_from, ckpt_io.LANGUAGE_MODEL)
        self.out_dir, c = ckpt_io.open_run(c, c.preset, self.resume_from, resume_meta, RESUMABLE)
        self.config = c

        self.log(f"fastgpt pretrain: preset {c.preset}, {info.world_size} process(es) on {info.device}")
        self.log("settings: " + json.dumps(dataclasses.asdict(c)))

        # Rank 0 prepares the token files; the others then find them in the cache.
        if not info.is_main:
            dist_utils.barrier(info)
        self.data = prepare_data(c.data, c.vocab_size, c.val_fraction, c.cache_dir, log=self.log)
        if info.is_main:
            dist_utils.barrier(info)
        if self.resume_from is not None:
            # The tokenizer is trained on the data: another one means the data changed since the run began, and the
            # token ids the model learnt would mean other text.
            saved = Path(self.resume_from) / "tokenizer.json"
            if saved.exists() and saved.read_text(encoding="utf-8") != Path(self.data.tokenizer_path).read_text(
                    encoding="utf-8"):
                raise ckpt_io.CheckpointError(
                    f"--resume {self.resume_from}: the tokenizer trained on the data now differs from the run's "
                    f"({saved}): the data changed since the run began, and the token ids the model learnt would "
                    f"change meaning; resume with the run's data, or start a new run")
        self.tokenizer = self.data.tokenizer()
        self.sampler = BatchSampler(self.data.train, c.block_size, c.batch_size, c.seed, info.rank, info.world_size)
        next(validation_batches(self.data.val, c.block_size, c.batch_size, 1))  # a clear error now if val is too small

        torch.manual_seed(c.seed)  # the same initial weights on every rank
        model, self.model_config = build_model(c, self.data.vocab_size)
        if resume_meta is not None:
            ckpt_io.check_model_config(resume_meta["model_config"], self.model_config, self.resume_from)
            model.load_state_dict(resume_weights)
        self.model = model.to(info.device)
        self.n_params = model.num_parameters()
        self.amp_dtype = autocast_dtype(c, info.device)

        dims = parameter_dims(self.model)  # before FSDP flattens the parameters
        wrapped = self.model
        if c.compile:
            wrapped = torch.compile(wrapped)
        if c.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel

            wrapped = FullyShardedDataParallel(wrapped, use_orig_params=True, device_id=info.device if info.device.type == "cuda" else None)
        elif info.distributed:
            wrapped = DistributedDataParallel(wrapped, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.wrapped = wrapped

        self.optimizer = make_optimizer(wrapped, c.lr, c.weight_decay, (c.beta1, c.beta2), c.adam_eps,
                                        fused=info.device.type == "cuda", dims=dims)
        self.scheduler = make_scheduler(self.optimizer, c.warmup_steps, c.max_steps, c.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp_dtype == torch.float16)

        self.step = 0
        self.tokens_seen = 0
        if resume_state is not None:
            self._load_trainer_state(resume_state)
            self.log(f"resumed from {self.resume_from} at step {self.step}")
        else:
            torch.manual_seed(c.seed + info.rank)  # each rank draws its own dropout masks
            if info.device.type == "cuda":
                torch.cuda.manual_seed(c.seed + info.rank)

        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(c.to_json() + "\n")
            shutil.copyfile(self.data.tokenizer_path, self.out_dir / "tokenizer.json")
            self.metrics = MetricsLog(self.out_dir, c.tensorboard, resume_step=self.step)
            if self.metrics.note:
                self.log(self.metrics.note)
        self.tokens_per_step = c.batch_size * c.grad_accum * info.world_size * c.block_size
        self.flops_per_token = flops_per_token(self.model.num_parameters(exclude_position_embeddings=True),
                                               c.n_layer, c.n_embd, c.block_size)
        self.peak, self.peak_source = peak_flops(info.device, self.amp_dtype)
        meta = self.data.meta
        self.log(
            f"model: {self.n_params / 1e6:.2f}M parameters; data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} "
            f"val tokens, vocabulary {meta['vocab_size']:,}; unigram baseline {meta['unigram_val_loss']:.3f} nats/token; "
            f"{self.tokens_per_step:,} tokens/step ({c.batch_size} x {c.grad_accum} accum x {info.world_size} ranks x "
            f"{c.block_size}); precision {str(self.amp_dtype).removeprefix('torch.')}; peak {self.peak / 1e12:.3g} "
            f"TFLOP/s ({self.peak_source}); run dir {self.out_dir}"
        )

    def _trainer_state(self) -> dict:
        rngs = dist_utils.all_gather_objects(rng_state(self.info.device), self.info)
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt_state = get_optimizer_state_dict(self.wrapped, self.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt_state = self.optimizer.state_dict()
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "optimizer": opt_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rngs,
        }

    def _load_trainer_state(self, state: dict) -> None:
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        rngs = state["rng"]
        if len(rngs) != self.info.world_size:
            self.log(f"note: checkpoint saved by {len(rngs)} rank(s), resumed on {self.info.world_size}: "
                     "data order is exact, dropout masks are not")
        set_rng_state(rngs[self.info.rank % len(rngs)], self.info.device)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]

    def _weights(self) -> dict:
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def save(self) -> None:
        state = self._trainer_state()  # a collective: every rank takes part
        weights = self._weights()
        if self.info.is_main:
            meta = {"config": dataclasses.asdict(self.config), "model_config": self.model_config,
                    "data": {k: self.data.meta[k] for k in ("sources", "vocab_size", "unigram_val_loss")}}
            tokenizer = Path(self.data.tokenizer_path).read_text(encoding="utf-8")
            path = ckpt_io.save_checkpoint(self.out_dir / "checkpoints", self.step, weights, state, meta,
                                           self.config.keep_checkpoints, files={"tokenizer.json": tokenizer})
            self.log(f"checkpoint {path}")
        dist_utils.barrier(self.info)

    # -- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict:
        with backend_context(self.config.backend, self.info.device):
            try:
                self._prepare()
                return self._loop()
            finally:
                if self.info.is_main and hasattr(self, "metrics"):
                    self.metrics.close()
                self._close_process_group()

    def _close_process_group(self) -> None:
        """Free DDP's reducer before destroying the process group, not after.

        The reducer's C++ destructor runs holding the GIL. Were it to drop the last reference to a gloo group, the
        group's destructor would join the worker threads, one of which may be freeing a finished collective whose
        tensors need the GIL to release their Python objects: a deadlock, seen under load as a run that printed
        "done" and never exited. Freed first, the group's last reference goes in destroy_process_group, whose
        binding releases the GIL. When the run is failing, the frames of the error's traceback (the loop's, the
        forward's) still hold the wrapper: their locals are cleared first (line numbers stay for the report).
        """
        if self.info.distributed:
            error = sys.exc_info()[1]
            if error is not None:
                traceback.clear_frames(error.__traceback__)  # skips the frames still executing
            self.__dict__.pop("wrapped", None)
            gc.collect()  # the wrapper may sit in a reference cycle
        dist_utils.teardown(self.info)

    def _full_weights(self):
        """Under FSDP each rank holds a shard: gather the whole model on every rank for evaluation and sampling."""
        if not self.config.fsdp:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self.wrapped, writeback=False)

    def _eval_and_sample(self, samples: bool) -> float:
        with self._full_weights():
            return self._eval_and_sample_full(samples)

    def _eval_and_sample_full(self, samples: bool) -> float:
        c = self.config
        val_loss = evaluate(self.model, self.data.val, c, self.info, self.amp_dtype)
        self.log(f"step {self.step}: val loss {val_loss:.4f}, perplexity {perplexity(val_loss):.2f} "
                 f"(unigram baseline {self.data.meta['unigram_val_loss']:.3f})")
        if self.info.is_main:
            self.metrics.log(self.step, val_loss=val_loss, val_ppl=perplexity(val_loss))
        if not math.isfinite(val_loss):
            # Diverged weights end the run here, before a sample draws from NaN logits or a checkpoint saves them
            # (save_checkpoint would refuse them too). Finite weights (an fp16 overflow) go on, without samples.
            bad = ckpt_io.nonfinite_weights(self.model.state_dict())
            if bad:
                raise ckpt_io.diverged(self.step, f"validation loss {val_loss}", bad)
            samples = False
        if self.info.is_main and samples and c.sample_tokens > 0:
            for prompt, text in zip(c.prompts, generate_samples(self.model, self.tokenizer, c.prompts,
                                                                 c.sample_tokens, self.info.device, self.amp_dtype)):
                self.log(f"sample [{prompt!r}]: {text!r}")
                self.metrics.log(self.step, sample_prompt=prompt, sample=text)
        return val_loss

    def _loop(self) -> dict:
        c, info = self.config, self.info
        losses: list[float] = []
        model = self.wrapped
        start_time = time.perf_counter()
        interval_start, interval_losses = time.perf_counter(), []
        while self.step < c.max_steps:
            step_loss = torch.zeros((), device=info.device)
            for micro in range(c.grad_accum):
                inputs, targets = self.sampler.next_batch()
                inputs, targets = inputs.to(info.device, non_blocking=True), targets.to(info.device, non_blocking=True)
                # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs.
                sync = micro == c.grad_accum - 1 or not info.distributed
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast(info.device, self.amp_dtype):
                        loss = next_token_loss(model, inputs, targets) / c.grad_accum
                    self.scaler.scale(loss).backward()
                step_loss += loss.detach()
            self.scaler.unscale_(self.optimizer)
            # --grad-clip 0 clips nothing; an infinite bound still measures the norm for the log line.
            max_norm = c.grad_clip or math.inf
            if c.fsdp:
                grad_norm = model.clip_grad_norm_(max_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            interval_losses.append(dist_utils.all_reduce_mean(step_loss, info))

            checkpoint_due = self.step % c.checkpoint_interval == 0 and self.step < c.max_steps
            # A checkpoint closes the log window too: a run resumed from it redoes only the steps after it, so the
            # losses since the last log line go on record before it is saved.
            if self.step % c.log_interval == 0 or self.step == c.max_steps or checkpoint_due:
                values = torch.stack(interval_losses).tolist()
                losses.extend(values)
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = len(values) * self.tokens_per_step / elapsed
                mfu = tokens_per_s * self.flops_per_token / (self.peak * info.world_size)
                self.log(f"step {self.step:>6}/{c.max_steps} | loss {values[-1]:.4f} | lr {lr:.3e} | "
                         f"{tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | grad norm {float(grad_norm):.3f} | "
                         f"epoch {self.sampler.epoch:.2f} | {time.perf_counter() - start_time:.0f} s")
                if info.is_main:
                    for offset, value in enumerate(values):
                        record = {"loss": value}
                        if offset == len(values) - 1:
                            record.update(lr=lr, tokens_per_s=tokens_per_s, mfu=mfu, grad_norm=float(grad_norm),
                                          tokens=self.tokens_seen)
                        self.metrics.log(self.step - len(values) + 1 + offset, **record)
                interval_start, interval_losses = time.perf_counter(), []
            if self.step % c.eval_interval == 0 and self.step < c.max_steps:
                self._eval_and_sample(samples=True)
            if checkpoint_due:
                self.save()

        train_time = time.perf_counter() - start_time
        val_loss = self._eval_and_sample(samples=True)
        self.save()
        baseline = self.data.meta["unigram_val_loss"]
        summary = {
            "steps": self.step, "tokens": self.tokens_seen, "train_seconds": round(train_time, 1),
            "final_train_loss": losses[-1] if losses else None, "val_loss": val_loss, "val_ppl": perplexity(val_loss),
            "unigram_baseline": baseline, "parameters": self.n_params, "run_dir": str(self.out_dir), "losses": losses,
        }
        if info.is_main:
            note = plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss_curve.png", baseline)
            if note:
                self.log(note)
            (self.out_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
        self.log(f"done: {self.step} steps, {self.tokens_seen:,} tokens in {train_time:.0f} s | final val loss "
                 f"{val_loss:.4f} (perplexity {perplexity(val_loss):.1f}) vs unigram baseline {baseline:.4f} | "
                 f"{self.n_params / 1e6:.2f}M params | {self.out_dir}")
        return summary


def pretrain(config: PretrainConfig, resume: str | None = None, log=print) -> dict:
    return Run(config, resume, log).train()
