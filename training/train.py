"""Train a lesion classifier on HAM10000 (locally or as a SageMaker training job).

    dermscore train --data ../shared/data/ham10000 --out models/default

The split is lesion-grouped and stratified (``training.data.lesion_split``);
class imbalance is handled half by sampling and half by loss weights (each
~1/sqrt(frequency)), which balances classes in expectation without showing
the 85 dermatofibroma images sixty times an epoch. After the last epoch the
validation split calibrates a softmax temperature and picks the melanoma
threshold; both are stored in the model's metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import (
    Compose,
    Lambda,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianSmooth,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensity,
    RandShiftIntensity,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import WeightedRandomSampler
from tqdm import tqdm

from batch.model import ARCHITECTURES, HEAD_LAYERS, ModelMeta, build_network, pick_device, save
from dermscore import __version__, options
from dermscore.labels import MELANOMA_INDEX
from training import data as ham
from training import ood
from training.metrics import classification_report, fit_temperature, melanoma_threshold, softmax

log = logging.getLogger("dermscore.train")
DEFAULT_INPUT_SIZE = (144, 192)  # (H, W): 4:3 like HAM10000, divisible by 16 (the shipped model's)


class RandSaturation(RandomizableTransform):
    """Scales colour saturation by a random factor: x' = grey + s (x - grey) on CHW 0..255 pixels.

    Dermatoscopes and cameras differ in colour rendering as much as in white balance; white balance
    is removed by colour constancy in the network, saturation is not.
    """

    def __init__(self, prob: float, factors: tuple[float, float]) -> None:
        super().__init__(prob)
        self.factors = factors
        self.factor = 1.0

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self.factor = float(self.R.uniform(*self.factors))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.randomize()
        if not self._do_transform:
            return x
        grey = x.mean(dim=0, keepdim=True)
        return grey + self.factor * (x - grey)


def augmentations(acquisition: bool = False) -> Compose:
    """Dermoscopy is orientation-free, so flips and any rotation are safe; RandAffine's zoom + shift
    acts as a random resized crop; brightness, contrast and per-channel scaling mimic different
    dermatoscopes. ``acquisition`` (the v3 recipe) also varies saturation and adds a slight blur,
    and resamples only half the samples (bilinear resampling softens every image it touches)."""
    return Compose([
        RandFlip(prob=0.5, spatial_axis=0),
        RandFlip(prob=0.5, spatial_axis=1),
        RandAffine(prob=0.5 if acquisition else 0.8, rotate_range=math.pi, scale_range=(0.2, 0.2),
                   translate_range=(12, 16), padding_mode="reflection"),
        RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25)),
        RandScaleIntensity(prob=0.5, factors=0.12, channel_wise=True),
        RandShiftIntensity(prob=0.3, offsets=12.0),
        *([RandSaturation(prob=0.5, factors=(0.7, 1.3)),
           RandGaussianSmooth(prob=0.15, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0))] if acquisition else []),
        Lambda(lambda x: x.clamp_(0, 255)),
    ])


class Augmented(Randomizable):
    """The dataset transform: (uint8 CHW array, label) item -> (augmented float tensor, label).

    Randomizable, so that MONAI's DataLoader ``worker_init_fn`` (``set_rnd``, through the
    ``Compose`` that ``Dataset`` wraps every transform in) reseeds ``aug`` in each worker process:
    a plain callable is skipped there, and all workers would replay the same random stream.
    """

    def __init__(self, aug: Compose) -> None:
        self.aug = aug

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Augmented:
        self.aug.set_random_state(seed=seed, state=state)
        return self

    def randomize(self, data: object = None) -> None:  # the randomness lives in aug's transforms
        pass

    def __call__(self, d: dict) -> tuple[torch.Tensor, int]:
        return self.aug(torch.from_numpy(d["x"]).float()), d["y"]


def amp_policy(device: torch.device, bf16_supported: bool | None = None) -> tuple[bool, torch.dtype, bool]:
    """(autocast on, autocast dtype, GradScaler on) for training on ``device``.

    CUDA: mixed precision, bf16 where the GPU supports it (no loss scaling needed), else fp16 with
    a GradScaler. CPU: full fp32 (CPU autocast is slower than fp32 for this network).
    """
    if device.type != "cuda":
        return False, torch.bfloat16, False
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return (True, torch.bfloat16, False) if bf16_supported else (True, torch.float16, True)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
               amp: tuple[bool, torch.dtype, bool]) -> torch.Tensor:
    """One optimisation step: channels_last input, autocast per ``amp``, scaled backward. Returns
    the loss (a tensor: reading it synchronises with the GPU, so the caller decides when)."""
    x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp[1], enabled=amp[0]):
        loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, pixels: np.ndarray, device: torch.device,
                   batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(pixels[i : i + batch_size]).to(device, memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy()


# The arguments that define a training run beyond its data and size (recorded in metadata.json).
RECIPE = ("lr", "backbone_lr_scale", "weight_decay", "label_smoothing", "ema_decay", "color_constancy",
          "acquisition_augment", "batch_size")


def param_groups(model: torch.nn.Module, arch: str, lr: float, backbone_scale: float) -> list[dict]:
    """Two AdamW groups: the new head at ``lr``, the pretrained backbone at ``lr * backbone_scale``
    (a pretrained backbone needs smaller steps than a randomly initialised head)."""
    head = model.get_submodule(HEAD_LAYERS[arch])
    head_ids = {id(p) for p in head.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return [{"params": list(head.parameters()), "lr": lr}, {"params": backbone, "lr": lr * backbone_scale}]


def evaluated(model: torch.nn.Module, ema: AveragedModel | None) -> torch.nn.Module:
    """The network to evaluate and save: the weight average when there is one."""
    return model if ema is None else ema.module


def train(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    gen = seed_everything(args.seed)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size: autotune the convolutions once
    size = tuple(args.input_size)

    meta_df = ham.read_metadata(args.data)
    if args.limit:
        meta_df = meta_df.sample(n=min(args.limit, len(meta_df)), random_state=args.seed).reset_index(drop=True)
    split_seed = args.seed if args.split_seed is None else args.split_seed
    train_df, val_df = ham.lesion_split(meta_df, args.val_fraction, split_seed)
    assert not set(train_df.lesion_id) & set(val_df.lesion_id), "lesion leaked across the split"
    log.info("split: %d train / %d val images (%d / %d lesions)", len(train_df), len(val_df),
             train_df.lesion_id.nunique(), val_df.lesion_id.nunique())

    t0 = time.time()
    train_px = ham.load_pixels(train_df.path.tolist(), size, progress=not args.quiet)
    val_px = ham.load_pixels(val_df.path.tolist(), size, progress=not args.quiet)
    train_y = train_df.label.to_numpy()
    val_y = val_df.label.to_numpy()
    log.info("decoded %d images in %.0fs", len(train_px) + len(val_px), time.time() - t0)

    counts = np.maximum(ham.class_counts(train_y), 1)
    inv_sqrt = 1.0 / np.sqrt(counts)
    sampler = WeightedRandomSampler(inv_sqrt[train_y], num_samples=len(train_y), replacement=True, generator=gen)
    loss_weights = torch.tensor(inv_sqrt / (inv_sqrt * counts / counts.sum()).sum(), dtype=torch.float32, device=device)

    aug = augmentations(args.acquisition_augment)
    aug.set_random_state(seed=args.seed)
    items = [{"x": train_px[i], "y": int(train_y[i])} for i in range(len(train_y))]
    dataset = Dataset(items, transform=Augmented(aug))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=len(items) > args.batch_size,
                        persistent_workers=args.workers > 0)

    model = build_network(args.arch, pretrained=args.pretrained, color_constancy=args.color_constancy)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, args.arch, args.lr, args.backbone_lr_scale),
                            weight_decay=args.weight_decay)
    # The exponential moving average of the weights is what is evaluated and saved (when on):
    # an average over the last ~1/(1-decay) steps generalises better than the last step's weights.
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)
           if args.ema_decay else None)
    steps_per_epoch = min(len(loader), args.max_batches or len(loader))
    total = args.epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    amp = amp_policy(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp[2])
    log.info("device %s, autocast %s, loss scaling %s, channels_last", device, amp[1] if amp[0] else "off",
             "on" if amp[2] else "off")
    loss_fn = torch.nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=args.label_smoothing)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    start_epoch, history = 0, []
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        gen.set_state(ckpt["sampler_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        model.train()
        t_epoch, seen, running = time.time(), 0, 0.0
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                   mininterval=args.progress_interval, disable=args.quiet)
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            loss = train_step(model, opt, scaler, loss_fn, x, y, device, amp)
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            seen += len(y)
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}", refresh=False)
        probs = softmax(predict_logits(evaluated(model, ema), val_px, device))
        rep = classification_report(probs, val_y)
        history.append({
            "epoch": epoch + 1, "train_loss": running, "train_images_per_s": seen / (time.time() - t_epoch),
            "val_balanced_accuracy": rep["balanced_accuracy"], "val_macro_auc": rep["macro_auc"],
            "val_mel_sens_at_spec80": rep["melanoma_sensitivity_at_specificity_0.80"],
        })
        log.info("epoch %d %s", epoch + 1, json.dumps(history[-1]))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None, "epoch": epoch + 1,
                    "history": history, "sampler_rng": gen.get_state(),
                    "torch_rng": torch.get_rng_state()}, ckpt_path)

    # Calibrate on the validation split (never trained on), then report on it.
    model = evaluated(model, ema)
    logits = predict_logits(model, val_px, device)
    temperature = fit_temperature(logits, val_y)
    probs = softmax(logits, temperature)
    threshold = melanoma_threshold(probs[:, MELANOMA_INDEX], val_y == MELANOMA_INDEX)
    val_energy = ood.energy(logits)  # out-of-distribution flag threshold, on the same split
    ood_threshold = ood.threshold(val_energy)
    meta = ModelMeta(
        name=args.name, version=args.version or time.strftime("%Y%m%d"), arch=args.arch, input_size=size,
        temperature=temperature, melanoma_threshold=threshold, color_constancy=args.color_constancy,
        extra={"seed": args.seed, "split_seed": split_seed, "epochs": args.epochs, "val_fraction": args.val_fraction,
               "recipe": {k: getattr(args, k) for k in RECIPE},
               "train_images": len(train_y), "val_images": len(val_y), "code_version": __version__,
               "ood": ood.summary(val_energy, ood_threshold, ood.IN_DISTRIBUTION_KEPT)},
        ood_threshold=ood_threshold,
    )
    save(model, meta, out)
    report = classification_report(probs, val_y, mel_threshold=threshold)
    (out / "train_report.json").write_text(json.dumps({"history": history, "validation": report}, indent=2) + "\n")
    if not args.keep_checkpoint:
        ckpt_path.unlink(missing_ok=True)
    val_df[["image_id", "lesion_id", "dx"]].to_csv(out / "validation_split.csv", index=False)
    log.info("saved %s (T=%.3f, mel threshold=%.3f): balanced acc %.3f, macro AUC %.3f", out, temperature,
             threshold, report["balanced_accuracy"] or float("nan"), report["macro_auc"] or float("nan"))
    return report


# The defaults are the shipped model's recipe (models/default/MODEL_CARD.md); the v3 recipe of the
# card's experiments is --input-size 150 200 --weight-decay 0.02 --backbone-lr-scale 0.5
# --label-smoothing 0.1 --ema-decay 0.999 --color-constancy 6 --acquisition-augment (it lost
# validation macro AUC).
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=options.folder, default=os.environ.get("SM_CHANNEL_TRAINING", options.DEFAULT_DATA),
                   help="HAM10000 folder: a metadata CSV (image_id, dx, lesion_id) and the images below it")
    sm_model_dir = os.environ.get("SM_MODEL_DIR")   # a SageMaker training job's output folder
    p.add_argument("--out", type=Path, default=Path(sm_model_dir) if sm_model_dir else None, required=not sm_model_dir,
                   help="the new model folder (required: the shipped models/default is never the default)")
    p.add_argument("--arch", choices=ARCHITECTURES, default="efficientnet_lite0", help="network")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from ImageNet weights (default: yes where the architecture has them)")
    p.add_argument("--name", default="dermscore-ham10000", help="model name (metadata.json)")
    p.add_argument("--version", default="", help="model version (default: today, YYYYMMDD)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the cosine schedule")
    p.add_argument("--batch-size", type=int, default=32, help="images per optimisation step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the head (AdamW)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's decoupled weight decay")
    p.add_argument("--backbone-lr-scale", type=float, default=1.0,
                   help="the pretrained backbone's learning rate as a fraction of --lr (the head's)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="of the cross-entropy loss")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="exponential moving average of the weights per step (0: off)")
    p.add_argument("--acquisition-augment", action="store_true",
                   help="also vary saturation and blur (the v3 recipe's camera-style augmentation)")
    p.add_argument("--color-constancy", type=float, default=0.0, metavar="P",
                   help="Shades of Gray colour constancy in the network, Minkowski p (0: off)")
    p.add_argument("--input-size", type=int, nargs=2, default=DEFAULT_INPUT_SIZE, metavar=("H", "W"),
                   help="network input in pixels")
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of lesions held out for validation")
    p.add_argument("--seed", type=int, default=20261123, help="seed of the split, sampling and augmentation")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the lesion split alone (default: --seed); keep it to train ensemble members "
                        "on one split, so they share a validation split none of them saw")
    options.add_device(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--workers", type=int, default=1, help="augmentation worker processes")
    p.add_argument("--limit", type=int, default=0, help="train on a random subset of this many images")
    p.add_argument("--max-batches", type=int, default=0, help="cap batches per epoch (smoke tests)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep <out>/checkpoint.pt after the last epoch")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress bar updates")
    options.add_quiet(p)


def run(args: argparse.Namespace) -> None:
    if args.pretrained is None:
        args.pretrained = args.arch.startswith("efficientnet_lite")
    train(args)


if __name__ == "__main__":  # SageMaker training entry point: python -m training.train
    from dermscore.cli import main

    main(["train", *__import__("sys").argv[1:]])
