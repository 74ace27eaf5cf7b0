"""Train a teacher on real data, with the papers' recipes as per-dataset defaults.

Every data-free method starts from a teacher trained on data we then pretend to have lost. This script makes
those teachers and saves them in the format every method reads (common.save_teacher: architecture, dataset,
class count, input shape, normalisation and test accuracy travel with the weights).

Defaults (spec/models.md section 5):
  cifar10/100   ResNet-34, SGD lr 0.1 momentum 0.9 wd 5e-4, batch 128, 500 epochs, lr x0.1 at 200 and 300,
                crop(pad 4) + flip: the TA-DFKD appendix recipe ("How to Train Various Teacher Models").
  mnist         LeNet-5, Adam lr 1e-3, batch 256, 100 epochs (TA appendix; DAFL's teacher-train.py ran 9),
                no augmentation, 28 -> 32 resize.
  tinyimagenet  ResNet-34 (TA's 64x64 key names), SGD 0.1 wd 1e-4, batch 256, 200 epochs, x0.1 at 120/150/180.
                PAPER-SILENT: TA fine-tuned an ImageNet model and gives no recipe; this is CMI train_scratch.py's.
  folder        ResNet-34, DAFL teacher-train.py's schedule: SGD 0.1 wd 5e-4, batch 128, 200 epochs, x0.1 at 80, 120.
  digits        WRN-16-2 at 16x16 (ours): SGD 0.1 wd 5e-4, batch 64, 30 epochs, x0.1 at 15 and 23, shift +-2 px,
                no flip (digits are not mirror-symmetric). About a minute on 2 CPU cores, ~99% on held-out digits.

Run:
  python train_teacher.py                                     # digits -> teachers/digits_wrn16_2.pt
  python train_teacher.py --dataset cifar10                   # paper recipe on a GPU
  python train_teacher.py --dataset folder --data-root DIR --arch resnet34 --snapshot-epochs 300,400
  python train_teacher.py --dataset cifar10 --resume          # continue an interrupted run
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

from common import (DATASETS, DEFAULT_TEACHER_ARCH, MODELS, Normalize, autocast, build_model, default_teacher_path,
                    check_amp, evaluate, fail, get_rng_state, load_checkpoint, load_data, load_teacher, pick_device,
                    random_crop_flip, save_checkpoint, save_teacher, seed_everything, set_rng_state, one_line_errors)

RECIPES = {  # optimizer, lr, weight decay, batch, epochs, lr milestones (x0.1), crop padding, horizontal flip
    "digits": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, batch_size=64, epochs=30, milestones=[15, 23],
                   padding=2, flip=False),
    "mnist": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=256, epochs=100, milestones=[],
                  padding=0, flip=False),
    "cifar10": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, batch_size=128, epochs=500, milestones=[200, 300],
                    padding=4, flip=True),
    "cifar100": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, batch_size=128, epochs=500, milestones=[200, 300],
                     padding=4, flip=True),
    "tinyimagenet": dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, batch_size=256, epochs=200,
                         milestones=[120, 150, 180], padding=4, flip=True),
    "folder": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, batch_size=128, epochs=200, milestones=[80, 120],
                   padding=4, flip=True),
}


def train_step(model, opt, normalize, x, y, padding, flip, amp="off", channels_last=False):
    """One SGD/Adam step on cross-entropy of a real batch x (B, C, H, W) in [0, 1], labels y (B,); returns the
    detached loss. Augmentation (crop + flip) on the device: no CPU augmentation workers. bench.py times this."""
    x = random_crop_flip(x, padding, flip)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, amp):
        loss = F.cross_entropy(model(normalize(x)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--dataset", default="digits", choices=DATASETS, help="training data (default: digits, no download)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets live or are downloaded; the "
                   "folder dataset's root (train/ and test/ or val/)")
    p.add_argument("--arch", default=None, choices=list(MODELS), help="architecture (default per dataset: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_TEACHER_ARCH.items()) + ")")
    p.add_argument("--image-size", type=int, default=None, help="input size (digits 16, MNIST/CIFAR 32, Tiny 64; "
                   "folder: first image's)")
    p.add_argument("--in-channels", type=int, default=None, help="folder dataset only: 1 or 3 (default: first image)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None)
    p.add_argument("--milestones", type=str, default=None, help="comma-separated epochs where lr is multiplied by 0.1")
    p.add_argument("--padding", type=int, default=None, help="random-crop padding in pixels (0 = no crop)")
    p.add_argument("--flip", type=int, choices=[0, 1], default=None, help="random horizontal flip")
    p.add_argument("--snapshot-epochs", type=str, default="", help="comma-separated epochs at which to keep an extra "
                   "teacher <out stem>_e<N>.pt (the TA-DFKD paper drew its five teachers from one long run)")
    p.add_argument("--out", default=None, help="teacher file (default teachers/<dataset>_<arch>.pt, where every "
                   "method looks by default)")
    p.add_argument("--overwrite", action="store_true", help="retrain even if --out exists (otherwise it is kept)")
    p.add_argument("--resume", action="store_true", help="continue from <out stem>.state.pt")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this epoch as if interrupted, keeping "
                   "the resume state (for testing --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None, help="autocast on any device, fp16 CUDA "
                   "only (default: bf16 on CUDA, off on the CPU)")
    p.add_argument("--channels-last", type=int, choices=[0, 1], default=1, help="channels_last memory format "
                   "(default 1 on every device: the digits teacher took 73 s instead of 95 s on 2 AVX2 CPU cores, "
                   "same 99.63 %%)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N epochs (default: ~20 evals a run)")
    args = p.parse_args(argv)
    recipe = RECIPES[args.dataset]
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.milestones, str):
        args.milestones = [int(m) for m in args.milestones.split(",") if m.strip()]
    args.snapshot_epochs = [int(e) for e in args.snapshot_epochs.split(",") if e.strip()]
    args.arch = args.arch or DEFAULT_TEACHER_ARCH[args.dataset]
    args.out = args.out or (default_teacher_path(args.dataset) if args.arch == DEFAULT_TEACHER_ARCH[args.dataset]
                            else os.path.join("teachers", f"{args.dataset}_{args.arch}.pt"))
    args.eval_every = args.eval_every or max(1, args.epochs // 20)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        fail("--epochs, --batch-size and --lr must be positive")
    if any(e < 1 or e > args.epochs for e in args.snapshot_epochs):
        fail(f"--snapshot-epochs must lie in 1..{args.epochs}")
    if args.arch.startswith("lenet") and (args.image_size or 32) != 32 and args.dataset != "mnist":
        fail("LeNet-5 needs 32x32 inputs; pass --image-size 32")
    return args


def main(argv=None):
    args = parse_args(argv)
    state_path = os.path.splitext(args.out)[0] + ".state.pt"
    if os.path.exists(args.out) and not (args.overwrite or args.resume):
        _, meta = load_teacher(args.out, args.dataset)
        print(f"teacher {args.out} exists; kept. Pass --overwrite to retrain.")  # load_teacher printed its accuracy
        return meta
    state = load_checkpoint(state_path) if args.resume else None
    if state is not None and not {"arch", "num_classes"} <= set(state):
        fail(f"{state_path} is not a train_teacher.py resume state (it lacks the model/optimizer/epoch entries); "
             f"drop --resume to train from scratch, or pass the --out of the interrupted teacher run")
    device = pick_device(args.device)
    check_amp(args.amp, device)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "off")  # CPU default off: unchanged by issue 14
    seed_everything(args.seed)
    image_size = args.image_size or (32 if args.arch.startswith("lenet") else None)
    data = load_data(args.dataset, args.data_root, args.batch_size, 512, image_size, args.in_channels, device=device)
    if state is not None and (state["num_classes"], state["arch"]) != (data.num_classes, args.arch):
        fail(f"{state_path} is a {state['arch']} with {state['num_classes']} classes but this run is a {args.arch} "
             f"on {args.dataset} with {data.num_classes}; pass the same --dataset/--arch or drop --resume")
    model = build_model(args.arch, data.num_classes, data.in_channels).to(device)
    channels_last = bool(args.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    normalize = Normalize(data.mean, data.std).to(device)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, 0.1)
    start_epoch, acc = 0, 0.0
    if state is not None:
        if not {"model", "opt", "sched", "rng", "epoch", "acc"} <= set(state):
            fail(f"{state_path} is an incomplete resume state; drop --resume to train from scratch")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        set_rng_state(state["rng"])
        start_epoch, acc = state["epoch"], state["acc"]
        print(f"resumed {state_path} at epoch {start_epoch}")
    print(f"training {args.arch} on {args.dataset} ({data.num_classes} classes, {data.in_channels}x{data.image_size}"
          f"x{data.image_size}) on {device} for {args.epochs} epochs", flush=True)
    meta = dict(arch=args.arch, dataset=args.dataset, num_classes=data.num_classes, in_channels=data.in_channels,
                image_size=data.image_size, mean=data.mean, std=data.std)
    t0 = time.time()
    for epoch in range(start_epoch + 1, args.epochs + 1):
        model.train()
        t_epoch, seen, loss_sum = time.time(), 0, torch.zeros((), device=device)
        for x, y in data.train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = train_step(model, opt, normalize, x, y, args.padding, bool(args.flip), args.amp, channels_last)
            loss_sum += loss * y.numel()
            seen += y.numel()
        sched.step()
        if epoch % args.eval_every == 0 or epoch == args.epochs or epoch in args.snapshot_epochs:
            acc = evaluate(model, data.test, normalize, device, args.amp, channels_last)
            dt = time.time() - t_epoch
            eta = (time.time() - t0) / (epoch - start_epoch) * (args.epochs - epoch)
            print(f"epoch {epoch}/{args.epochs} | loss {loss_sum.item() / seen:.4f} | test acc {acc:.2f}% | "  # SYNC
                  f"{seen / dt:.0f} img/s | lr {sched.get_last_lr()[0]:.4g} | eta {eta / 60:.1f} min", flush=True)
        if epoch in args.snapshot_epochs:
            snap = f"{os.path.splitext(args.out)[0]}_e{epoch}.pt"
            save_teacher(snap, model, test_acc=acc, epoch=epoch, **meta)
            print(f"snapshot {snap} (test acc {acc:.2f}%)")
        if epoch % args.eval_every == 0 or epoch == args.epochs or epoch == args.stop_after:
            save_checkpoint(state_path, {"model": model.state_dict(), "opt": opt.state_dict(),
                                         "sched": sched.state_dict(), "rng": get_rng_state(), "epoch": epoch,
                                         "acc": acc, "arch": args.arch, "num_classes": data.num_classes})
        if epoch == args.stop_after:
            print(f"stopped after epoch {epoch}; continue with --resume")
            return None
    save_teacher(args.out, model, test_acc=acc, epoch=args.epochs, **meta)
    os.remove(state_path)  # the finished teacher replaces the resume state
    print(f"teacher test acc {acc:.2f}% -> {args.out} ({time.time() - t0:.0f} s)")
    return dict(meta, test_acc=acc)


if __name__ == "__main__":
    main()
