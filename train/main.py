"""``python -m train.main``: train the diffusion view of a converted model.

The backbone stays frozen; only the diffusion tensors (and their AdamW state) change. The
step runs on a JAX mesh (``--mesh data=N,fsdp=N,tensor=N``); started as several processes
(``--num-processes``, ``--process-id``, ``--coordinator``) it joins them with
``jax.distributed`` and each process reads only its rows of every global batch.

OUT receives:

- ``checkpoints/<step>/``: Orbax checkpoints (diffusion tensors, optimizer state, data
  position), every ``--save-every`` steps, the last ``--keep`` kept;
- ``metrics.jsonl``: one line per logged step (loss, accuracy, lr, grad norm, tokens/s,
  drafted positions, sequences skipped for having no possible anchor) and per evaluation;
- ``curves.png``: loss, draft accuracy and held-out tokens per iteration by step, redrawn
  at every checkpoint;
- ``head.safetensors``: the diffusion tensors of the newest checkpoint as an int8 head
  (``python -m convert.head apply`` puts it on the model; ``--init-head`` continues it);
- ``model/``: the final model folder (config.json + params), ready for
  ``python -m infer.generate`` and ``python -m convert.to_hf``; with ``--eval-prompts``
  it holds the final evaluation's acceptance profile (``acceptance.json``), so
  ``--block-size auto`` works on it.

A NaN or infinite loss stops the run before anything is saved; the last good checkpoint
stays as it was. ``--resume`` continues from the newest complete checkpoint exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from infer.compile_cache import add_compile_cache_args, enable_compile_cache_from
from orthrus_jax.cli import CommandError, non_negative_int, positive_int, run_command
from orthrus_jax.config import DTYPE_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (convert.from_hf/from_gguf)")
    p.add_argument("--data", nargs="+", required=True,
                   help="training files: JSONL chat/GSM8K, JSON arrays, or plain text")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=positive_int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="global sequences per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step")
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="diffusion block size K (default: the model's, or --init-head's; "
                        "written to its config)")
    p.add_argument("--init-head", default=None,
                   help="start from this head file's diffusion tensors (python -m "
                        "convert.head export), e.g. to continue a shipped head")
    p.add_argument("--anchors-per-seq", type=positive_int, default=256)
    p.add_argument("--anchors-on-assistant", action="store_true",
                   help="only anchors whose first drafted token is an assistant token")
    p.add_argument("--loss", choices=("kl", "ce"), default="kl")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up share of the steps")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--mesh", default="data=-1", help="e.g. data=2,fsdp=2,tensor=2")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="backbone dtype (default: as stored); diffusion weights train in f32")
    p.add_argument("--remat", action="store_true", help="recompute each layer in backward")
    p.add_argument("--loss-chunk", type=positive_int, default=16,
                   help="anchor blocks per logits chunk")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed records instead of stopping")
    p.add_argument("--save-every", type=positive_int, default=500)
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep")
    p.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="0: only before and after")
    p.add_argument("--eval-prompts", help="JSONL prompts for tokens-per-iteration evaluation")
    p.add_argument("--eval-max-new-tokens", type=positive_int, default=128)
    p.add_argument("--eval-shares-weights", action="store_true",
                   help="evaluate on the training model's stacked weights (one lax.scan over "
                        "the layers) instead of a per-layer copy: no second copy of the "
                        "backbone in memory, slower evaluation decoding")
    p.add_argument("--log-every", type=positive_int, default=1)
    p.add_argument("--resume", action="store_true", help="continue from OUT's newest checkpoint")
    p.add_argument("--stop-after", type=positive_int, default=None,
                   help="end this invocation after N more steps, with a checkpoint (for time "
                        "slots and preemptible jobs); continue later with --resume")
    p.add_argument("--coordinator", default=os.environ.get("ORTHRUS_COORDINATOR"),
                   help="host:port of process 0, for multi-process runs")
    p.add_argument("--num-processes", type=int,
                   default=int(os.environ.get("ORTHRUS_NUM_PROCESSES", "1")))
    p.add_argument("--process-id", type=int,
                   default=int(os.environ.get("ORTHRUS_PROCESS_ID", "0")))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_compile_cache_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compile_cache_from(args)
    return run_command(lambda: run(args))


class TrainingDiverged(CommandError):
    """A non-finite loss: the run stops and the last good checkpoint stays."""


def _validate(args: argparse.Namespace) -> None:
    """What the argparse types do not check (counts are ``positive_int`` already)."""
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    if args.num_processes > 1:
        if not args.coordinator:
            raise ValueError("--num-processes > 1 needs --coordinator host:port")
        # CPU collectives across processes (ignored by GPU/TPU backends). Asking for the
        # backend here would initialise it too early.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)

    # Imported after jax.distributed.initialize: nothing may touch the devices before it.
    from infer.engine import Generator, summarize
    from infer.prompts import load_tokenizer, read_prompts_file
    from orthrus_jax.checkpoint import load_model
    from orthrus_jax.sharding import make_mesh
    from train.batches import BatchIterator
    from train.checkpoints import TrainCheckpoints, abstract_state
    from train.records import Corpus
    from train.step import TrainConfig, Trainer

    mesh = make_mesh(args.mesh)
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch_size % data_shards:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the mesh's data "
                         f"axes (data x fsdp = {data_shards})")
    if args.batch_size % jax.process_count():
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    out = Path(args.out)
    ckpt_dir = out.absolute() / "checkpoints"
    if not args.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise FileExistsError(f"{ckpt_dir} has checkpoints: pass --resume to continue, or "
                              "choose another --out")

    model = load_model(args.model, mesh=mesh, param_dtype=args.dtype)
    if args.init_head:
        from convert.head import apply_head

        model = apply_head(model, args.init_head)
    if args.block_size is not None:
        model.config = model.config.replace(block_size=args.block_size)
    config = model.config
    if args.seq_len < config.block_size + 1:
        raise ValueError(f"--seq-len {args.seq_len} is below block size + 1 "
                         f"({config.block_size + 1})")
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files: training data needs one")
    corpus = Corpus(args.data, skip_malformed=args.skip_malformed)
    trainer = Trainer(model, TrainConfig(
        total_steps=args.steps, lr=args.lr, warmup_frac=args.warmup, clip_norm=args.clip,
        weight_decay=args.weight_decay, grad_accum=args.grad_accum, loss=args.loss,
        loss_chunk=args.loss_chunk, remat=args.remat), mesh)

    data_kwargs = dict(batch_size=args.batch_size, seq_len=args.seq_len,
                       block_size=config.block_size, anchors_per_seq=args.anchors_per_seq,
                       seed=args.seed, anchors_on_assistant=args.anchors_on_assistant,
                       process_index=jax.process_index(), process_count=jax.process_count())
    manager = TrainCheckpoints(ckpt_dir, keep=args.keep)
    state = trainer.init_state()
    start_step = 0
    if args.resume and manager.latest_step() is not None:
        start_step = manager.latest_step()
        state, meta = manager.restore(start_step, abstract_state(state))
        batches = BatchIterator.from_state(
            meta["data"], corpus, tokenizer,
            **{k: v for k, v in data_kwargs.items()
               if k in ("batch_size", "anchors_per_seq", "anchors_on_assistant",
                        "process_index", "process_count")})
        _log(out, {"event": "resume", "step": start_step})
    else:
        batches = BatchIterator(corpus, tokenizer, **data_kwargs)
    # A run killed after its last checkpoint but before model/ was complete still owes
    # the final model: it is written from that checkpoint, with no step taken.
    if start_step > args.steps or (start_step == args.steps and (out / "model").is_dir()):
        print(f"nothing to do: checkpoint step {start_step} >= --steps {args.steps}")
        return 0

    eval_prompts = []
    if args.eval_prompts:  # text prompts go through the chat template when there is one
        chat = bool(getattr(tokenizer, "chat_template", None))
        # One engine for the whole run: each evaluation swaps in the current diffusion
        # tensors and reuses the programs compiled for the first.
        gen = Generator(model, tokenizer, unstack=not args.eval_shares_weights)
        eval_prompts = [gen.encode_item(item, chat)
                        for item in read_prompts_file(args.eval_prompts)]

    last_eval: dict = {}

    def evaluate(state, step: int) -> None:
        if not eval_prompts:
            return
        t0 = time.perf_counter()
        gen.update_diffusion(trainer.model(state))
        results = gen.generate(eval_prompts, max_new_tokens=args.eval_max_new_tokens,
                               batch_size=8)
        totals = summarize(results)
        last_eval.update(step=step, accepted_hist=totals["accepted_hist"])
        _log(out, {"event": "eval", "step": step,
                   "tokens_per_iteration": totals["tokens_per_iteration"],
                   "accepted_hist": totals["accepted_hist"],
                   "prompts": len(results), "seconds": time.perf_counter() - t0,
                   "programs_compiled": len(gen.compile_seconds)})

    def save(state, step: int, data_state: dict) -> None:
        _draw_curves(out)
        if jax.process_index() == 0:  # the latest diffusion tensors, ready to ship or apply
            from convert.head import save_head

            save_head(trainer.model(state), out / "head.safetensors",
                      metadata={"step": step, "train_args": " ".join(sys.argv[1:])})
        manager.save(step, state, {"data": data_state,
                                   "args": {k: v for k, v in vars(args).items()
                                            if isinstance(v, (int, float, str, list))}})

    if start_step == 0:
        evaluate(state, 0)
    end = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    try:
        state = _train_loop(args, trainer, batches, state, start_step, end, save, evaluate,
                            out, ckpt_dir)
    finally:
        manager.wait_until_finished()  # a save in flight completes, whatever happened
        manager.close()
    if end < args.steps:
        print(f"stopped after step {end} of {args.steps}: continue with --resume")
        return 0
    evaluate(state, end)
    _draw_curves(out)
    profile = None
    if last_eval:  # the final evaluation's acceptance: what --block-size auto needs
        from infer.block_size import AcceptanceProfile

        profile = AcceptanceProfile(
            config.block_size, tuple(last_eval["accepted_hist"]),
            f"{len(eval_prompts)} prompts of {args.eval_prompts}, greedy, "
            f"{args.eval_max_new_tokens} new tokens, step {last_eval['step']}")
    _save_final(trainer.model(state), out / "model", args.model, profile)
    return 0


def _train_loop(args, trainer, batches, state, start: int, end: int, save, evaluate,
                out: Path, ckpt_dir: Path):
    """Steps ``start + 1 .. end``: log, check the loss, save and evaluate on schedule."""
    from train.step import BATCH_KEYS
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    progress = None
    if jax.process_index() == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True)
    t_last, last_step = time.perf_counter(), start
    pending: tuple[int, dict] | None = None  # a dispatched step whose metrics await logging

    def log(step: int, metrics: dict) -> None:
        nonlocal t_last, last_step
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            raise TrainingDiverged(
                f"loss is {metrics['loss']} at step {step}: stopping without saving; the "
                f"last good checkpoint in {ckpt_dir} is unchanged")
        now = time.perf_counter()  # the step has finished: its metrics are here
        rate = tokens_per_step * (step - last_step) / max(now - t_last, 1e-9)
        t_last, last_step = now, step
        _log(out, {"event": "train", "step": step, **metrics, "tokens_per_second": rate,
                   "skipped_sequences": batches.skipped_sequences})
        if progress is not None:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{rate:.0f}")

    def next_batch() -> dict:
        micro = [next(batches) for _ in range(args.grad_accum)]
        return {name: _global_array(trainer, np.stack([getattr(b, name) for b in micro]))
                for name in BATCH_KEYS}

    # The host never waits on a step it has just dispatched: while step t runs, it logs
    # step t - 1 (already finished) and prepares the batch of step t + 1. A checkpoint of
    # step t records the data position after step t's batch, not after the one prepared.
    batch = next_batch()
    position = batches.state()
    for step in range(start + 1, end + 1):
        state, metrics = trainer.step(state, batch)
        step_position = position
        if pending is not None:
            log(*pending)
            pending = None
        saving = step % args.save_every == 0 or step == end
        if step % args.log_every == 0 or saving:
            pending = (step, metrics)
        if step < end:
            batch = next_batch()
            position = batches.state()
        if progress is not None:
            progress.update(1)
        if saving:  # the loss of a step is checked before its state is saved
            log(*pending)
            pending = None
            save(state, step, step_position)
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            evaluate(state, step)
    if pending is not None:
        log(*pending)
    if progress is not None:
        progress.close()
    return state


def _draw_curves(out: Path) -> None:
    """``curves.png`` beside ``metrics.jsonl`` (process 0)."""
    if jax.process_index() == 0 and (out / "metrics.jsonl").is_file():
        from train.curves import plot_curves

        plot_curves(out / "metrics.jsonl")


def _global_array(trainer, local: np.ndarray) -> jax.Array:
    """A global ``[A, B, ...]`` array from this process's rows ``[A, B / P, ...]``."""
    sharding = trainer.batch_sharding(local.ndim)
    global_shape = (local.shape[0], local.shape[1] * jax.process_count(), *local.shape[2:])
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def _log(out: Path, record: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _save_final(model, dst: Path, src_model: str, profile=None) -> None:
    """The trained model as a model folder with the source's tokenizer, replacing ``dst``
    only once complete. Every process takes part (the parameter save is collective)."""
    import shutil

    from jax.experimental import multihost_utils

    from orthrus_jax.checkpoint import save_model
    from orthrus_jax.folders import copy_tokenizer_files, replace_dir

    tmp = dst.with_name(f".{dst.name}.partial")
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices("orthrus-final-model-begin")
    save_model(model, tmp)
    multihost_utils.sync_global_devices("orthrus-final-model-saved")
    if primary:
        copy_tokenizer_files(src_model, tmp)
        if profile is not None:
            profile.save(tmp)
        replace_dir(tmp, dst)


if __name__ == "__main__":
    sys.exit(main())
