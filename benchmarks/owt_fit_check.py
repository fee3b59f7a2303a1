"""Does each `experiment=owt_*` training step fit one GPU at its per-device batch? (issue 15 §1)

For every OpenWebText experiment: compose its config as `mdlm-dmmd experiment=NAME` does, feed
random GPT-2 token ids of its shape instead of OpenWebText (the GPU machine is offline, and memory
and speed do not depend on the tokens), give each distillation experiment a teacher of its kind
(the teacher experiment's network after its own measured updates: random weights, the right
process, schedule and block size), and run `trainer.fit` for 4 updates (D-MMD: 2 generator and 2
auxiliary phases, each with its own AdamW) in the experiment's precision (bf16-mixed), EMA and
model. Accumulation is set to 1 (it adds micro-batches, not memory: the gradients exist after the
first one). The configured batch is tried first; while it fits, twice as many rows are tried
(`--doublings`), and when it does not, half as many, down to 1.

Reported per try: fits, out of memory (cuBLAS allocation failures included), or the error that
stopped it (the other experiments go on); `torch.cuda.max_memory_allocated` and `_reserved` (GB)
and the median seconds per update after the first two. D-MMD experiments run first. These numbers justify (or correct) the
`loader.batch_size` of each `configs/experiment/owt_*.yaml`.

    python benchmarks/owt_fit_check.py                      # on the GPU machine, all experiments
    python benchmarks/owt_fit_check.py --device cpu --tiny  # a smoke run of this script on CPU
Writes benchmarks/results/owt_fit_check_<time>/ (or --out): results.md, results.json, run_info.json,
rewritten after every try, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_info import command_line, results_dir, run_info, write_results, write_run_info  # noqa: E402

GPT2 = 50257  # token ids; masked networks add the mask
# In the order run: D-MMD first (the question), each teacher just before what it teaches;
# a distillation experiment takes the network its teacher experiment left.
TEACHER_OF = {
    "owt_masked_teacher": None,
    "owt_masked_dmmd": "owt_masked_teacher",
    "owt_uniform_teacher": None,
    "owt_uniform_dmmd": "owt_uniform_teacher",
    "owt_block256_teacher": None,
    "owt_block256_dmmd16": "owt_block256_teacher",
    "owt_masked_idlm": "owt_masked_teacher",
    "duo_teacher": None,
    "owt_duo_idlm": "duo_teacher",
}
# Teachers no experiment trains (owt_duo_idlm distils a public Duo checkpoint): experiment + overrides.
RECIPES = {"duo_teacher": ("owt_uniform_teacher", ["noise=duo"])}
EXPERIMENTS = [name for name in TEACHER_OF if name not in RECIPES]
# --tiny: the same experiments at a shape a CPU runs in seconds (blocks of 64 in 256 tokens).
TINY = ["model.hidden_dim=64", "model.cond_dim=32", "model.n_blocks=2", "model.n_heads=2", "model.length=256"]
UPDATES, UNTIMED = 4, 2


class UpdateTimer:
    """Seconds between the ends of successive training steps (synchronised on CUDA)."""

    def __init__(self):
        import lightning as L

        ends: list[float] = []

        class Callback(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                ends.append(time.perf_counter())

        self.callback, self.ends = Callback(), ends

    def median(self) -> float | None:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])][UNTIMED - 1:]
        return round(statistics.median(gaps), 4) if gaps else None


def compose(name: str, teacher: str | None, batch: int, tiny: bool, device: str):
    from mdlm_dmmd import cli

    experiment, extra = RECIPES.get(name, (name, []))
    overrides = [f"experiment={experiment}", *extra, f"loader.batch_size={batch}", "trainer.accumulate_grad_batches=1",
                 f"trainer.max_steps={UPDATES}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                 "trainer.enable_progress_bar=false", f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}"]
    if teacher is not None:
        overrides.append(f"algo.teacher={teacher}")
    if tiny:
        overrides += TINY + (["block_size=64"] if "block256" in name else [])
    if device == "cpu":
        overrides.append("trainer.precision=32-true")  # bf16 autocast on CPU measures nothing useful here
    return cli.compose(overrides)


def one_try(name: str, teacher: str | None, batch: int, args, keep: Path | None) -> dict:
    """Fit UPDATES updates of experiment `name` at `batch` rows; if they fit and `keep` does not
    exist yet, save the run there as its final.ckpt would be (a teacher for the distillations)."""
    import lightning as L
    from omegaconf import OmegaConf

    from mdlm_dmmd import registry

    row = {"experiment": name, "algo": "?", "batch": batch, "configured_batch": None}
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    algo = trainer = None
    try:
        cfg = compose(name, teacher, batch, args.tiny, args.device)
        row["algo"] = cfg.algo.name
        config = OmegaConf.to_container(cfg, resolve=True)
        config["vocab"] = {"size": GPT2, "bos_id": GPT2 - 1, "eos_id": GPT2 - 1, "modality": "text", "image_shape": None}
        torch.manual_seed(0)
        algo = registry.load_algo(cfg.algo.name)(config)
        length = int(cfg.model.length)
        data = [{"input_ids": torch.randint(0, GPT2, (batch, length))} for _ in range(UPDATES)]
        kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
        if not algo.automatic_optimization:  # as training.build_trainer: the alternation does these itself
            kwargs.pop("accumulate_grad_batches", None)
            kwargs.pop("gradient_clip_val", None)
        timer = UpdateTimer()
        trainer = L.Trainer(**kwargs, logger=False, enable_checkpointing=False, enable_model_summary=False,
                            callbacks=[timer.callback], default_root_dir=tempfile.gettempdir())
        trainer.fit(algo, torch.utils.data.DataLoader(data, batch_size=None))
        row.update(fits=True, seconds_per_update=timer.median())
        if keep is not None and not keep.exists():  # as a user's teacher run leaves it (final.ckpt)
            trainer.save_checkpoint(str(keep), weights_only=True)
    except Exception as err:  # one experiment's failure must not end the others
        row.update(fits=False, seconds_per_update=None)
        if not out_of_memory(err):
            row["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
            traceback.print_exc()
    finally:
        if args.device == "cuda":
            row.update(peak_allocated_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 2))
        del algo, trainer
        gc.collect()
    return row


def out_of_memory(err: Exception) -> bool:
    """CUDA's allocator, or a library allocating on the device (cuBLAS), ran out of memory."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


def search(name: str, teacher: str | None, args, keep: Path | None, rows: list, write) -> None:
    """The configured batch, then doublings while it fits or halvings while it does not."""
    from mdlm_dmmd import cli

    configured = int(cli.compose([f"experiment={name}"]).loader.batch_size) if args.batch is None else args.batch
    batch, step = configured, None
    for _ in range(args.doublings + 12):
        row = one_try(name, teacher, batch, args, keep)
        row["configured_batch"] = configured
        rows.append(row)
        write()
        print(row, flush=True)
        if "error" in row:
            return
        if step is None:
            step = 2 if row["fits"] else 0.5
        if (step == 2 and (not row["fits"] or batch >= configured * 2 ** args.doublings)) or \
                (step == 0.5 and (row["fits"] or batch == 1)):
            return
        batch = int(batch * step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=EXPERIMENTS, choices=EXPERIMENTS)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized model (smoke run of the script)")
    parser.add_argument("--batch", type=int, default=None, help="start here instead of the configured batch")
    parser.add_argument("--doublings", type=int, default=1, help="doublings tried past a batch that fits")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("owt_fit_check: no CUDA device here (use --device cpu --tiny for a smoke run)")
    started = time.time()
    out = args.out or results_dir("owt_fit_check")
    rows: list[dict] = []

    def write(final: bool = False) -> None:
        lines = ["# One GPU, `experiment=owt_*`, one training step per try (random tokens and weights)", "",
                 "| experiment | algo | configured batch | batch | fits | peak allocated GB | peak reserved GB | s / update |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['experiment']} | {r['algo']} | {r['configured_batch']} | {r['batch']} | "
                         f"{'yes' if r['fits'] else r.get('error', 'out of memory')} | {r.get('peak_allocated_gb', '–')} | "
                         f"{r.get('peak_reserved_gb', '–')} | {r['seconds_per_update'] or '–'} |")
        info = run_info(command_line("owt_fit_check.py", args), started,
                        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
        if final:  # printed too
            write_results(out, rows, lines)
            write_run_info(out, info)
        else:  # after every try, quietly: a run stopped by a time limit keeps what it measured
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(rows, indent=2))
            (out / "results.md").write_text("\n".join(lines) + "\n")
            (out / "run_info.json").write_text(json.dumps(info, indent=2))

    wanted = set(args.experiments)
    with tempfile.TemporaryDirectory() as tmp:
        teachers: dict[str, str] = {}
        for name, teacher_name in TEACHER_OF.items():
            needed_as_teacher = any(TEACHER_OF[n] == name for n in wanted)
            if name not in wanted and not needed_as_teacher:
                continue
            if teacher_name is not None and teacher_name not in teachers:
                rows.append({"experiment": name, "algo": "?", "batch": "–", "configured_batch": "–", "fits": False,
                             "seconds_per_update": None, "error": f"no teacher: {teacher_name} did not fit or failed"})
                write()
                continue
            teacher = None if teacher_name is None else teachers[teacher_name]
            keep = Path(tmp) / f"{name}.ckpt" if teacher_name is None else None
            if name in wanted:
                search(name, teacher, args, keep, rows, write)
            else:  # only its network is needed: one try at one row
                one_try(name, None, 1, args, keep)
            if keep is not None and keep.exists():
                teachers[name] = str(keep)
    write(final=True)


if __name__ == "__main__":
    main()
