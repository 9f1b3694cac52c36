"""Human motion end to end on a CPU budget: clip classifier, tokenizer, class-conditional AR and MaskGIT.

    OMP_NUM_THREADS=1 nice -n 10 python bench/motion.py --out runs/bench_motion

Everything goes through the project's own entry points (``tokenforge.train`` / ``evaluate`` /
``tokenize`` / ``sample`` with ``configs/motion_vq.yaml``, ``motion_ar.yaml``, ``motion_maskgit.yaml``
and dotlist overrides that shrink them), except the clip classifier, which has no command: it is
trained here with ``metrics.motion.train_motion_classifier``. Stages:

1. ``deepmimic`` windows (``--num-train`` / ``--num-val``, 64 frames at 30 Hz, cached) and the clip
   classifier on the train windows; its val accuracy is reported. The row *data* compares a class-
   balanced subset of train windows (same size as val) with val: the floor of the classifier FID and
   the diversity/multimodality/plausibility of real motion.
2. The tokenizer (T2M-GPT-style VQ, 4x downsampling) for ``--tokenizer-steps``; ``evaluate`` gives
   MPJPE / velocity error / code usage on val, and the row *reconstruction* scores the val windows
   decoded from their codes (labels = their clips) with the same metrics as samples.
3. ``tokenize`` (train + val codes with labels), then each prior for ``--prior-steps``; ``evaluate
   --classifier`` draws ``--samples-per-class`` samples per clip label (class-balanced) and scores them
   against val with ``stage1.modalities.motion.MotionSamples`` (clip-classifier FID, diversity,
   multimodality, accuracy; foot skating, contact speed, ground penetration). ``sample`` writes a few
   stick-figure GIFs per prior.

Results go to ``<out>/motion_results.json`` (after each stage; a finished stage is reused when the
script is run again with the same ``--out``, and so is an existing checkpoint: delete a stage's key
from the JSON to re-score it without retraining) and a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # 1 on a shared machine
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree's packages (modalities, ...)

from data.atomic import atomic_write_text  # noqa: E402
from data.deepmimic import MotionDataModule  # noqa: E402
from metrics.motion import MotionClipClassifier, classifier_accuracy, train_motion_classifier  # noqa: E402
from stage1.modalities.motion import MotionSamples  # noqa: E402
from tokenforge.evaluate import main as evaluate_main  # noqa: E402
from tokenforge.runs import open_run  # noqa: E402
from tokenforge.sample import main as sample_main  # noqa: E402
from tokenforge.tokenize import main as tokenize_main  # noqa: E402
from tokenforge.train import main as train_main  # noqa: E402

SAMPLE_KEYS = ("clip_classifier_fid", "diversity", "diversity_real", "multimodality", "clip_classifier_accuracy",
               "foot_skating_ratio", "foot_contact_speed", "foot_contact_rate", "ground_penetration",
               "foot_skating_ratio_real", "ground_penetration_real")
GIF_CLASSES = ("walk", "run", "backflip", "cartwheel")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/bench_motion")
    p.add_argument("--num-train", type=int, default=1800)
    p.add_argument("--num-val", type=int, default=450)
    p.add_argument("--classifier-epochs", type=int, default=15)
    p.add_argument("--tokenizer-steps", type=int, default=1500)
    p.add_argument("--prior-steps", type=int, default=1500)
    p.add_argument("--samples-per-class", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args()


def data_overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.params.num_train={args.num_train}", f"data.params.num_val={args.num_val}",
            f"data.params.batch_size={args.batch_size}"]


def split_tensors(dm: MotionDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = dm.split_dataset(split)
    batch = data.__getitems__(list(range(len(data))))
    return batch["x"].float(), batch["label"].long()


def score(real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor, classifier: Path) -> dict[str, Any]:
    """The sample metrics of the motion modality (the same evaluator ``evaluate`` uses for priors)."""
    evaluator = MotionSamples({"classifier": str(classifier)})
    evaluator.update(real=real)
    evaluator.update(fake=fake, labels=labels)
    return evaluator.compute()


def stage_data_and_classifier(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    dm = MotionDataModule(num_train=args.num_train, num_val=args.num_val, batch_size=args.batch_size)
    dm.setup()
    train_x, train_y = split_tensors(dm, "train")
    val_x, val_y = split_tensors(dm, "val")
    start = time.process_time()
    model = train_motion_classifier(train_x, train_y, num_classes=dm.num_classes, class_names=dm.class_names,
                                    epochs=args.classifier_epochs)
    val_acc = classifier_accuracy(model, val_x, val_y)
    path = model.save(out / "clip_classifier.pt", val_accuracy=val_acc)
    # The real-vs-real reference: as many train windows as val windows, every class equally often.
    per_class = len(val_x) // dm.num_classes
    keep = torch.cat([torch.nonzero(train_y == c).flatten()[:per_class] for c in range(dm.num_classes)])
    data_row = score(val_x, train_x[keep], train_y[keep], path)
    return {"classifier": {"val_accuracy": val_acc, "train_accuracy": classifier_accuracy(model, train_x, train_y),
                           "epochs": args.classifier_epochs, "num_train": len(train_x), "num_val": len(val_x),
                           "cpu_s": time.process_time() - start, "path": str(path)},
            "data": data_row}


def stage_tokenizer(args: argparse.Namespace, out: Path, classifier: Path) -> dict[str, Any]:
    overrides = [
        "model.params.encoder.channels=64", "model.params.encoder.z_channels=64", "model.params.embed_dim=32",
        "model.params.encoder.num_res_blocks=1", "model.params.quantizer.params.codebook_size=256",
        "model.params.lr=1e-3", "model.params.warmup_steps=100", f"trainer.max_steps={args.tokenizer_steps}",
        f"trainer.val_check_interval={args.tokenizer_steps // 3}", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", f"checkpoint_every_n_steps={args.tokenizer_steps}",
        f"callbacks.0.params.every_n_steps={args.tokenizer_steps}", *data_overrides(args)]
    start = time.process_time()
    ckpt = out / "runs/motion_vq/checkpoints/last.ckpt"
    if not ckpt.is_file():  # resuming a finished run would rewrite last.ckpt (new hash: priors refuse it)
        train_main([str(ROOT / "configs/motion_vq.yaml"), "--runs", str(out / "runs"), "--name", "motion_vq",
                    *overrides])
    train_s = time.process_time() - start
    evaluated = evaluate_main([str(ckpt), "--out", str(out / "eval/motion_vq"), "--batch-size", "64"])
    run = open_run(ckpt, expect="tokenizer")
    run.model.eval()
    dm = run.datamodule(batch_size=64)
    dm.setup()
    val_x, val_y = split_tensors(dm, "val")
    with torch.no_grad():
        recon = torch.cat([run.model.decode(run.model.encode(val_x[i:i + 64])).clamp(-1, 1)
                           for i in range(0, len(val_x), 64)])
    row = score(val_x, recon, val_y, classifier)
    numbers = {k: v for k, v in evaluated.items() if isinstance(v, int | float)}
    return {"tokenizer": numbers | {"steps": args.tokenizer_steps, "train_cpu_s": train_s, "checkpoint": str(ckpt)},
            "reconstruction": row}


def stage_prior(args: argparse.Namespace, out: Path, name: str, classifier: Path) -> dict[str, Any]:
    overrides = [f"data.params.codes={out / 'codes'}", "model.params.dim=128", "model.params.depth=4",
                 "model.params.heads=4", "model.params.dropout=0.0", "model.params.warmup_steps=100",
                 f"trainer.max_steps={args.prior_steps}", f"trainer.val_check_interval={args.prior_steps // 3}",
                 "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                 f"checkpoint_every_n_steps={args.prior_steps}", f"data.params.batch_size={args.batch_size}"]
    start = time.process_time()
    ckpt = out / f"runs/{name}/checkpoints/last.ckpt"
    if not ckpt.is_file():
        train_main([str(ROOT / f"configs/{name}.yaml"), "--runs", str(out / "runs"), "--name", name, *overrides])
    train_s = time.process_time() - start
    num_classes = len(MotionDataModule().class_names)
    # The tokenizer trained above, named explicitly: same weights even if its file was rewritten since.
    tokenizer = ["--tokenizer", str(out / "runs/motion_vq/checkpoints/last.ckpt")]
    evaluated = evaluate_main([str(ckpt), "--classifier", str(classifier), "--out", str(out / f"eval/{name}"),
                               "--num-samples", str(args.samples_per_class * num_classes), "--batch-size", "64",
                               *tokenizer])
    sample_main([str(ckpt), "-n", str(len(GIF_CLASSES)), "--class", *GIF_CLASSES, "--out", str(out / f"gifs/{name}"),
                 *tokenizer])
    row = {k: evaluated[k] for k in (*SAMPLE_KEYS, "num_samples", "sampling", "sample_code_usage") if k in evaluated}
    return row | {"steps": args.prior_steps, "train_cpu_s": train_s, "checkpoint": str(ckpt),
                  "val_loss": _last_val_loss(out / f"runs/{name}")}


def _last_val_loss(run_dir: Path) -> float | None:
    import csv

    path = run_dir / "logs/csv/metrics.csv"
    if not path.is_file():
        return None
    values = [float(r["val/loss"]) for r in csv.DictReader(open(path)) if r.get("val/loss")]
    return values[-1] if values else None


def markdown(results: dict[str, Any]) -> str:
    cols = ("clip_classifier_fid", "diversity", "multimodality", "clip_classifier_accuracy", "foot_skating_ratio",
            "foot_contact_speed", "ground_penetration")
    lines = ["| rows vs val windows | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in ("data", "reconstruction", "motion_ar", "motion_maskgit"):
        row = results.get(name)
        if row:
            cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else "-" for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "motion_results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    results["command"] = "OMP_NUM_THREADS=1 nice -n 10 python bench/motion.py " + " ".join(sys.argv[1:])
    results["settings"] = vars(args)

    def save() -> None:
        atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True, default=str))

    classifier = out / "clip_classifier.pt"
    stages = [("data", lambda: stage_data_and_classifier(args, out)),
              ("reconstruction", lambda: stage_tokenizer(args, out, classifier)),
              ("codes", lambda: {"codes": {"folder": str(out / "codes"), "done": bool(tokenize_main(
                  [str(out / "runs/motion_vq/checkpoints/last.ckpt"), "--out", str(out / "codes")]) or True)}}),
              ("motion_ar", lambda: {"motion_ar": stage_prior(args, out, "motion_ar", classifier)}),
              ("motion_maskgit", lambda: {"motion_maskgit": stage_prior(args, out, "motion_maskgit", classifier)})]
    for key, run in stages:
        if key in results:
            print(f"[bench/motion] {key}: reused from {path}")
            continue
        start, cpu = time.perf_counter(), time.process_time()
        results |= run()
        results.setdefault("cpu_s", {})[key] = time.process_time() - cpu
        results.setdefault("wall_s", {})[key] = time.perf_counter() - start
        save()
        print(f"[bench/motion] {key} done in {time.perf_counter() - start:.0f} s")
    MotionClipClassifier.load(classifier)  # the checkpoint loads weights-only
    print(markdown(results))


if __name__ == "__main__":
    main()
