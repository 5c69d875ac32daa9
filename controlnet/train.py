"""Train a ControlNet (mask -> image) on top of a trained LDM, with accelerate.

    python train.py --data_root DATA --ldm_checkpoint ../ldm/ldm_checkpoints/checkpoint_best.pt \
        --output_dir ./controlnet_checkpoints --batch_size 8 --num_epochs 100 --learning_rate 1e-5
    accelerate launch --multi_gpu --num_processes 2 train.py ...same flags...     (batch_size is per process)
    python train.py ...same flags... --resume                                     (continue the run)

The LDM's UNet is frozen by default (--no_freeze_unet trains it too); the ControlNet starts as a copy of the
UNet's encoder. Writes OUTPUT_DIR/checkpoint_best.pt (lowest validation loss), checkpoint_last.pt (--resume),
log.txt, tensorboard/, samples/ (mask | sample | ground truth grids) and progress.gif (the grids so far as an
animation, rebuilt after each one). The flags are listed in README.md.

Objective: the ControlNet adds residuals to the LDM's UNet, so it predicts what that UNet predicts
(--prediction_type defaults to the LDM's; another value is refused); --snr_gamma G weights the loss by
min-SNR-gamma (Hang et al. 2023; 0 = off). --posthoc_ema_every_steps N writes post-hoc EMA snapshots (EDM2)
of the ControlNet to OUTPUT_DIR/posthoc_ema/ (posthoc_ema.py rebuilds any EMA length). A resumed run keeps all.
"""
import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import medical
import animation
import posthoc_ema
from dataset import (EpochSampler, PairDataset, describe_unpaired, groups_of, label_of, pair_slices, read_class_labels,
                     read_options, split_indices, validate_pairs)
from models import (SCHEDULERS, ControlledUNet, DummyEncoder, UserError, build_controlnet, check_same_ldm, decode,
                    encode, initial_latents, load_flagged_checkpoint, load_ldm, make_sampler, min_snr_weights,
                    noise_scheduler, plain, sample, training_target)
from runtime import (EMA, FlagParser, StopFlags, Throughput, TrainingError, add_resume_flag, any_rank, atomic_save,
                     check_writable, finish_distributed, get_logger, mean_over_ranks, memory_mb, optimizer_kwargs,
                     param_table, remove_stale_temporaries, resolve_precision, resolve_resume, rng_state, run_main,
                     save_png_replace, set_rng_state, to_pil)

LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
# Settings a run keeps for life (None on the command line: not given -> the resumed run's value or this default).
LIFELONG_DEFAULTS = dict(snr_gamma=0.0, posthoc_ema_every_steps=0,
                         posthoc_ema_sigma_rels="0.05,0.1")  # posthoc_ema.add_flags' default, one spelling


def parse_args(argv=None):
    """Command line -> argparse.Namespace (both -/_ spellings of every flag, old names as aliases)."""
    p = FlagParser(description="Train a mask-guided ControlNet on top of a trained LDM.")
    a = p.add_argument
    a("--data_root", required=True, aliases=["dataset_path", "data_path"], help="folder of images/ and masks/")
    a("--images_folder", default="images")
    a("--masks_folder", default="masks")
    a("--image_prefix", default="", help="stem prefix of images, e.g. Img_ (pairs Img_001 with seg_001)")
    a("--mask_prefix", default="", help="stem prefix of masks, e.g. seg_")
    a("--skip_unpaired", action="store_true", help="train on the pairs found and ignore unpaired files")
    a("--class_labels_csv", default=None,
      help="CSV of 'image_stem,class_name' rows: condition on the LDM's classes as well as the mask")
    a("--mask_channels", type=int, default=1, choices=(1, 3))
    a("--ldm_checkpoint", required=True, help="checkpoint_best.pt of ldm/train.py")
    a("--vae", default=None, help="override the VAE folder recorded in the LDM checkpoint")
    a("--output_dir", default="./controlnet_checkpoints")
    a("--batch_size", type=int, default=8, aliases=["train_batch_size"], help="per process")
    a("--num_epochs", type=int, default=100, aliases=["epochs"])
    a("--learning_rate", type=float, default=1e-5, aliases=["lr"])
    a("--weight_decay", type=float, default=1e-2)
    a("--lr_warmup_steps", type=int, default=0)
    a("--max_grad_norm", type=float, default=1.0)
    a("--freeze_unet", action="store_true", default=True, help="keep the LDM's UNet frozen (default)")
    a("--no_freeze_unet", dest="freeze_unet", action="store_false", aliases=["train_unet"],
      help="train the UNet (and the class embedder) together with the ControlNet")
    a("--train_encoder", action="store_true",
      help="train the condition encoder even with a frozen UNet (default: it follows the UNet)")
    a("--ema_decay", type=float, default=0.9999)
    a("--prediction_type", default=None, choices=("epsilon", "v_prediction", "sample"),
      help="what the UNet predicts: the LDM's (the default, and the only value accepted)")
    a("--snr_gamma", type=float, default=None, help="min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; "
                                                     "0 = off (default)")
    posthoc_ema.add_flags(p)
    p.set_defaults(posthoc_ema_every_steps=None, posthoc_ema_sigma_rels=None)  # None: not given (kept on resume)
    a("--val_fraction", type=float, default=0.1, help="share of pairs held out for the validation loss")
    a("--random_flip", action="store_true", default=True, aliases=["hflip"],
      help="random horizontal flips (default on)")
    a("--no_random_flip", dest="random_flip", action="store_false", aliases=["no_hflip", "no_flip"])
    a("--vflip", action="store_true", help="random vertical flips too")
    a("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    a("--compile", action="store_true", help="torch.compile the model")
    a("--compile_backend", default="inductor")
    a("--seed", type=int, default=42)
    a("--num_workers", type=int, default=None, help="DataLoader workers (default: 4 on GPU, 0 on CPU)")
    a("--max_train_steps", type=int, default=0, aliases=["max_steps"],
      help="stop after this many optimizer steps in total (0: no limit)")
    a("--max_minutes", type=float, default=0, aliases=["time_limit_minutes"],
      help="stop cleanly (validation + checkpoints) after this many minutes of training (0: no limit)")
    a("--log_every_steps", type=int, default=50, aliases=["log_every"])
    a("--ckpt_every_steps", type=int, default=0, aliases=["save_every_steps"],
      help="also write checkpoint_last.pt every N steps (0: only at the checkpoint epochs)")
    a("--ckpt_every_epochs", type=int, default=1, aliases=["val_every", "val_every_epochs"],
      help="epochs between validation + checkpoints (the last epoch always)")
    a("--sample_every_epochs", type=int, default=1, help="epochs between sample grids (0: none)")
    a("--num_val_samples", type=int, default=4, help="masks in the TensorBoard/PNG sample grid")
    a("--sample_steps", type=int, default=25, help="denoising steps of the sample grid (0: no grid)")
    a("--sample_scheduler", default="ddim", choices=SCHEDULERS)
    add_resume_flag(p)
    a("--trust_checkpoint", action="store_true", help="allow checkpoints that hold pickled Python objects")
    medical.add_read_flags(p)  # --intensity_window (must match the LDM's), --slice_axis, --slice_range, --group_regex
    args = p.parse_args(argv)
    for flag, ok in (("batch_size", args.batch_size >= 1), ("num_epochs", args.num_epochs >= 1),
                     ("learning_rate", args.learning_rate > 0), ("ema_decay", 0 <= args.ema_decay < 1),
                     ("val_fraction", 0 <= args.val_fraction < 1), ("log_every_steps", args.log_every_steps >= 1),
                     ("ckpt_every_steps", args.ckpt_every_steps >= 0),
                     ("ckpt_every_epochs", args.ckpt_every_epochs >= 1),
                     ("sample_every_epochs", args.sample_every_epochs >= 0), ("sample_steps", args.sample_steps >= 0),
                     ("lr_warmup_steps", args.lr_warmup_steps >= 0), ("num_val_samples", args.num_val_samples >= 0),
                     ("max_train_steps", args.max_train_steps >= 0), ("max_minutes", args.max_minutes >= 0),
                     ("snr_gamma", args.snr_gamma is None or args.snr_gamma >= 0),
                     ("posthoc_ema_every_steps", args.posthoc_ema_every_steps is None
                      or args.posthoc_ema_every_steps >= 0)):
        if not ok:
            raise UserError(f"--{flag} is out of range: {getattr(args, flag)}")
    if args.posthoc_ema_sigma_rels is not None:  # one spelling, so that a resumed run compares equal
        args.posthoc_ema_sigma_rels = ",".join(
            f"{v:g}" for v in posthoc_ema.parse_sigma_rels(args.posthoc_ema_sigma_rels))
    return args


def main(argv=None):
    """Entry point: UserError -> one `error:` line and exit 2, TrainingError -> exit 1 (runtime.run_main)."""
    return run_main(lambda: train(parse_args(argv)))


# ---------------------------------------------------------------------------------------------- inputs
def prepare_inputs(args):
    """Every check of the inputs that needs no process group -> (pairs, labels, ldm, resume, data); writes nothing.

    `data`: the ReadOptions (the LDM's window), each pair's patient / volume group, the dropped mask slices."""
    root = Path(args.data_root)
    if not root.is_dir():
        raise UserError(f"--data_root {root} is not a folder")
    try:
        cli = medical.options_from_args(args)  # the slicing; the window is settled below, with the LDM's
    except ValueError as e:
        raise UserError(str(e)) from None
    pairs, un_i, un_m, dropped = pair_slices(root / args.images_folder, root / args.masks_folder,
                                             args.image_prefix, args.mask_prefix, cli)
    if un_i or un_m:
        msg = describe_unpaired(un_i, un_m)
        if not pairs:
            raise UserError(f"no image/mask pairs in {root} ({msg}); check --image_prefix/--mask_prefix")
        if not args.skip_unpaired:
            raise UserError(f"{msg}. Fix the names (or --image_prefix/--mask_prefix), or pass --skip_unpaired "
                            f"to train on the {len(pairs)} pairs found")
    ldm = load_ldm(args.ldm_checkpoint, args.trust_checkpoint, args.vae)
    ldm_kind = ldm.noise_scheduler_config["prediction_type"]
    if args.prediction_type not in (None, ldm_kind):
        raise UserError(f"--prediction_type {args.prediction_type}: the LDM {args.ldm_checkpoint} predicts "
                        f"{ldm_kind}, and the ControlNet only adds residuals to its UNet, so it must predict the "
                        f"same; drop the flag")
    args.prediction_type = ldm_kind
    labels = None
    if args.class_labels_csv:
        by_stem = read_class_labels(args.class_labels_csv, ldm.class_names)
        missing = [im for im, _ in pairs if label_of(im, by_stem) is None]
        if missing:
            raise UserError(f"--class_labels_csv {args.class_labels_csv} has no class for {len(missing)} image(s): "
                            + ", ".join(p.name for p in missing[:5]))
        labels = [label_of(im, by_stem) for im, _ in pairs]
    last = Path(args.output_dir) / LAST
    path = resolve_resume(args.resume, last if last.is_file() else None)
    resume = None
    if path is not None:
        resume = load_flagged_checkpoint(path, "--resume", args.trust_checkpoint, expect_type="controlnet")
        check_same_ldm(resume.get("ldm_fingerprint"), ldm.fingerprint, path, args.ldm_checkpoint,
                       resume.get("ldm_checkpoint"))
        for key, now in (("mask_channels", args.mask_channels), ("use_class_labels", labels is not None),
                         ("unet_trained", not args.freeze_unet)):
            if resume.get(key) != now:
                raise UserError(f"--resume {path} was trained with {key}={resume.get(key)}, this run asks "
                                f"for {now}; use the same flags or another --output_dir")
        keep_on_resume(args, resume.get("config") or {}, path)
        resume["path"] = str(path)
    elif last.exists():
        raise UserError(f"--output_dir {args.output_dir} already holds a run ({LAST}); pass --resume "
                        f"to continue it or choose another --output_dir")
    else:
        keep_on_resume(args, None)
    stored = (resume.get("config") or {}).get("intensity") if resume else None
    opts = read_options(args, ldm.intensity, stored, [im for im, _ in pairs])
    validate_pairs(pairs, args.mask_channels, opts)
    data = SimpleNamespace(opts=opts, groups=groups_of(pairs, opts), dropped=dropped)
    return pairs, labels, ldm, resume, data


def keep_on_resume(args, stored, path=None):
    """The lifelong settings: a flag left out takes the resumed run's value (runs from before a setting existed
    had its default) or, in a new run, the default; a given flag that differs from the resumed run's is refused."""
    for key, default in LIFELONG_DEFAULTS.items():
        given = getattr(args, key)
        kept = default if stored is None or stored.get(key) is None else stored[key]
        if stored is not None and given is not None and given != kept:
            raise UserError(f"--resume {path} was trained with {key}={kept}, this run asks for {given}; "
                            f"drop the flag or use another --output_dir")
        setattr(args, key, kept if given is None else given)


def check_run_folder(args, n_pairs, world, groups=None):
    """The checks that need the world size, then --output_dir proven writable (created) before heavy work."""
    n_train = len(split_indices(n_pairs, args.val_fraction, args.seed, groups)[0])
    if n_train < args.batch_size * world:
        raise UserError(f"{n_train} training pairs are fewer than one global batch "
                        f"(--batch_size {args.batch_size} x {world} processes); lower --batch_size")
    try:
        check_writable(args.output_dir)
    except UserError as e:
        raise UserError(f"--output_dir: {e}") from None


# ---------------------------------------------------------------------------------------------- building
def build(args, accelerator, ldm, labels, resume, log):
    """Networks, EMA, optimizer and lr schedule (resumed weights loaded) as one namespace `run`."""
    use_classes = labels is not None
    controlnet = build_controlnet(ldm.unet, args.mask_channels, ldm.vae_factor)
    if use_classes:
        encoder = ldm.class_embedder  # generation by class and mask together
    else:
        encoder = DummyEncoder(ldm.unet.config.cross_attention_dim, ldm.class_embedder.embedding.weight[-1])
    unet = ldm.unet
    unet.requires_grad_(not args.freeze_unet)
    encoder.requires_grad_(not args.freeze_unet or args.train_encoder)
    controlnet.requires_grad_(True)
    if resume:
        controlnet.load_state_dict(resume["controlnet"])
        encoder.load_state_dict(resume["encoder"])
        if resume.get("unet") is not None:
            unet.load_state_dict(resume["unet"])
    ema = EMA(controlnet, args.ema_decay, start=0)
    if resume and resume.get("ema_controlnet") is not None:
        ema.load_state_dict(resume["ema_controlnet"])
    # key: the checkpoint entry a reconstruction replaces; module: the trained ControlNet (not its EMA copy)
    phema = posthoc_ema.PostHocEMA({"ema_controlnet": controlnet}, posthoc_ema.parse_sigma_rels(
        args.posthoc_ema_sigma_rels), args.posthoc_ema_every_steps, Path(args.output_dir) / "posthoc_ema",
        active=accelerator.is_main_process)  # only rank 0 keeps and writes them
    if resume:
        phema.load_state_dict(resume.get("posthoc_ema"))
    device = accelerator.device
    ema.model.to(device)
    vae = ldm.vae.to(device)
    log.info("parameters:\n" + param_table({"VAE": vae, "UNet": unet, "ControlNet": controlnet,
                                            f"Encoder ({'class' if use_classes else 'dummy'})": encoder}))
    model = ControlledUNet(unet, controlnet, encoder).to(device)  # before AdamW: fused wants GPU parameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                  **optimizer_kwargs(device))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.lr_warmup_steps) if args.lr_warmup_steps else 1.0)
    if args.compile:
        model = torch.compile(model, backend=args.compile_backend)
    # The lr scheduler is not prepared: accelerate would step it once per process per step.
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    unet.train(not args.freeze_unet)
    return SimpleNamespace(
        args=args, accelerator=accelerator, device=device, ldm=ldm, use_classes=use_classes, model=model,
        raw_model=accelerator.unwrap_model(model, keep_torch_compile=False), controlnet=controlnet,
        encoder=encoder, unet=unet, vae=vae, ema=ema, phema=phema, trainable=trainable, optimizer=optimizer,
        lr_sched=lr_sched,
        sched=noise_scheduler(ldm.noise_scheduler_config), out=Path(args.output_dir), writer=None)


def make_loader(args, pairs, labels, ldm, world, rank, data=None):
    """(dataset, epoch sampler, loader, train indices, validation indices) of this rank."""
    train_idx, val_idx = split_indices(len(pairs), args.val_fraction, args.seed, data.groups if data else None)
    ds = PairDataset(pairs, ldm.image_channels, args.mask_channels, ldm.image_size, labels, ldm.num_classes,
                     args.seed, args.random_flip, args.vflip, data.opts if data else None)
    sampler = EpochSampler(train_idx, args.batch_size, world, rank, args.seed)
    gpu = torch.cuda.is_available()
    workers = args.num_workers if args.num_workers is not None else (4 if gpu else 0)
    # A private generator: otherwise each new DataLoader iterator draws its base seed from the global torch
    # RNG, which would make the training noise depend on where a resumed run restarted.
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                                         pin_memory=gpu, persistent_workers=gpu and workers > 0,
                                         generator=torch.Generator())
    return ds, sampler, loader, train_idx, val_idx


def restore(run, resume, world, rank, log):
    """Optimizer, lr schedule, grad scaler and RNG states of a resumed run -> (step, epoch, position, best)."""
    from accelerate.utils import set_seed
    if not resume:
        return 0, 0, 0, math.inf
    run.optimizer.load_state_dict(resume["optimizer"])
    run.lr_sched.load_state_dict(resume["lr_scheduler"])
    if run.accelerator.scaler is not None and resume.get("grad_scaler"):
        run.accelerator.scaler.load_state_dict(resume["grad_scaler"])
    step, epoch, pos = resume["global_step"], resume["epoch"], resume["step_in_epoch"]
    states = resume.get("rng_states") or []
    if len(states) == world:
        set_rng_state(states[rank])
    else:
        log.warning(f"checkpoint was written by {len(states)} process(es), this run has {world}: RNG streams "
                    f"are reseeded, so the continuation is not bit-identical")
        set_seed((run.args.seed + step) * world + rank)
    log.info(f"resumed from {resume['path']} at step {step} (epoch {epoch}, batch {pos})")
    if epoch >= run.args.num_epochs:
        log.info("the checkpoint already finished --num_epochs; nothing to do")
    return step, epoch, pos, resume.get("best_val_loss", math.inf)


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_state(run, epoch, pos, step, best, val_loss):
    """The full resumable state as a plain dict (a collective: it gathers every rank's RNG state)."""
    from accelerate.utils import gather_object
    a, ldm, acc = run.args, run.ldm, run.accelerator
    return {"model_type": "controlnet", "format_version": 1,
            "controlnet_config": plain(dict(run.controlnet.config)), "controlnet": run.controlnet.state_dict(),
            "ema_controlnet": run.ema.state_dict(), "encoder_type": "class" if run.use_classes else "dummy",
            "encoder": run.encoder.state_dict(), "unet": None if a.freeze_unet else run.unet.state_dict(),
            "unet_trained": not a.freeze_unet, "use_class_labels": run.use_classes,
            "mask_channels": a.mask_channels, "image_size": ldm.image_size, "image_channels": ldm.image_channels,
            "class_names": ldm.class_names, "num_classes": ldm.num_classes, "ldm_fingerprint": ldm.fingerprint,
            "ldm_checkpoint": str(Path(a.ldm_checkpoint).resolve()),
            "optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_sched.state_dict(),
            "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "global_step": step, "epoch": epoch, "step_in_epoch": pos, "best_val_loss": best, "val_loss": val_loss,
            "config": plain({**vars(a), "intensity": run.opts.to_config()}), "world_size": acc.num_processes,
            "rng_states": gather_object([rng_state()]), "posthoc_ema": run.phema.state_dict()}


def save_checkpoint(run, name, epoch, pos, step, best, val_loss=None):
    """Rank 0 writes atomically; every rank learns whether it worked (so none carries on alone) -> a label."""
    state, path, msg = checkpoint_state(run, epoch, pos, step, best, val_loss), run.out / name, ""
    if run.accelerator.is_main_process:
        try:
            atomic_save(state, path)
        except TrainingError as e:
            msg = str(e)
    if any_rank(bool(msg), run.device):
        raise TrainingError(msg or f"cannot write {path} (failed on the main process)")
    return f"{path} (step {step})"


# ---------------------------------------------------------------------------------------------- the loop
def train(args):
    """One training run (see the module docstring): build, resume, then step -> loss -> check -> update."""
    from accelerate import Accelerator  # imported here so `--help` and flag errors stay fast
    from accelerate.utils import set_seed  # seeds only: exact resume restores runtime.rng_state() instead

    pairs, labels, ldm, resume, data = prepare_inputs(args)  # bad input fails here, before any process group or write
    cuda = torch.cuda.is_available()
    precision = resolve_precision(args.mixed_precision, torch.device("cuda" if cuda else "cpu"))
    # cpu=True without CUDA: under `accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine a
    # plain Accelerator() starts two processes that each believe they are alone (DistributedType.NO, each
    # trains on all the data and writes the files); cpu=True makes it a real 2-process gloo run (MULTI_CPU).
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    check_run_folder(args, len(pairs), world, data.groups)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # what a process killed mid-save left
    accelerator.wait_for_everyone()
    log = get_logger(out, rank, "controlnet")
    log.info(f"world size {world} ({accelerator.distributed_type}), device {device}, mixed precision {precision}")
    ds, sampler, loader, train_idx, val_idx = make_loader(args, pairs, labels, ldm, world, rank, data)
    log.info(f"{len(pairs)} pairs ({len(train_idx)} train / {len(val_idx)} val), image {ldm.image_size}px x "
             f"{ldm.image_channels} ch, mask {args.mask_channels} ch, latent {ldm.latent_channels}x"
             f"{ldm.latent_size}x{ldm.latent_size} (VAE factor {ldm.vae_factor})")
    for line in medical.describe_data([im for im, _ in pairs], labels, ldm.class_names if labels else None, data.opts):
        log.info(f"data: {line}")
    if data.dropped:
        log.info(f"data: {len(data.dropped)} mask slice(s) left out because their image slice is empty (constant), "
                 f"e.g. {data.dropped[0].name}; they are not counted as unpaired")
    set_seed(args.seed * world + rank)  # per-rank streams (the ControlNet's init too); a resume restores them
    run = build(args, accelerator, ldm, labels, resume, log)
    log.info(f"objective: predicts {args.prediction_type} (the LDM's), min-SNR gamma {args.snr_gamma:g}"
             f"{' (off)' if not args.snr_gamma else ''}" + (f", post-hoc EMA sigma_rel {args.posthoc_ema_sigma_rels} "
                                                            f"every {args.posthoc_ema_every_steps} steps"
                                                            if args.posthoc_ema_every_steps else ""))
    run.opts = data.opts  # stored in every checkpoint ("intensity"): inference maps outputs back through it
    step, start_epoch, start_pos, best = restore(run, resume, world, rank, log)
    last_good = f"{resume['path']} (step {step})" if resume else "none written yet"
    del resume
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(str(out / "tensorboard"))
    steps_per_epoch, meter, losses = sampler.batches_per_epoch(), Throughput(), []
    done, reason = bool(args.max_train_steps and step >= args.max_train_steps), None
    with StopFlags(args.max_minutes, device) as stop, \
            contextlib.closing(run.writer) if run.writer else contextlib.nullcontext():
        for epoch in range(start_epoch, args.num_epochs):
            if done:
                break
            pos = start_pos if epoch == start_epoch else 0
            sampler.set_epoch(epoch, pos)
            for batch in loader:
                loss = training_loss(run, batch)
                stop.check_loss(loss, step + 1, last_good)  # before backward: a NaN never reaches the weights
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(run.trainable, args.max_grad_norm)
                run.optimizer.step()
                run.lr_sched.step()
                run.optimizer.zero_grad(set_to_none=True)
                step, pos = step + 1, pos + 1
                # diffusers-style warm-up min(decay, (1+n)/(10+n)): with a fixed 0.9999 the EMA of the zero-
                # initialised ControlNet would stay at its start for ~10k steps (the demo trains 400)
                run.ema.decay = min(args.ema_decay, step / (9 + step))
                run.ema.update(run.controlnet, step)
                run.phema.update(step)
                if args.posthoc_ema_every_steps and step % args.posthoc_ema_every_steps == 0:
                    write_posthoc_snapshot(run, step)
                meter.add(args.batch_size * world)
                losses.append(loss.detach())
                if step % args.log_every_steps == 0:
                    log_progress(run, log, step, epoch, losses, meter)
                    losses = []
                epoch_saves = pos == steps_per_epoch and epoch_due(args, epoch)
                if args.ckpt_every_steps and step % args.ckpt_every_steps == 0 and not epoch_saves:
                    last_good = save_checkpoint(run, LAST, epoch, pos, step, best)
                    log.info(f"saved {last_good}")
                reason = stop.should_stop(step)
                if reason == "SIGTERM":  # the cluster's warning before a kill: save now, continue with --resume
                    save_checkpoint(run, LAST, epoch, pos, step, best)
                    log.info(f"SIGTERM: wrote {out / LAST} at step {step}; exiting (continue with --resume)")
                    break
                done = reason == "time limit" or bool(args.max_train_steps and step >= args.max_train_steps)
                if done:
                    log.info(f"stopping at step {step}: --{'max_minutes' if reason else 'max_train_steps'} reached")
                    break
            if reason == "SIGTERM":
                break
            # where a resumed run continues: mid-epoch if the run stopped early, else at the next epoch
            nxt = (epoch, pos) if done and pos < steps_per_epoch else (epoch + 1, 0)
            best, last_good = end_of_epoch(run, log, ds, epoch, nxt, step, best, done, train_idx, val_idx,
                                           last_good)
    if reason != "SIGTERM":
        log.info(f"done: {step} steps; checkpoints in {out} (best validation loss {best:.5f})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    finish_distributed(0)  # multi-process: os._exit after the group is gone (gloo aborts at exit otherwise)


def write_posthoc_snapshot(run, step):
    """Rank 0 writes this step's post-hoc EMA snapshot; a failed write stops every rank (none waits forever)."""
    msg = ""
    if run.accelerator.is_main_process:
        try:
            run.phema.maybe_snapshot(step)
        except TrainingError as e:
            msg = str(e)
    if any_rank(bool(msg), run.device):
        raise TrainingError(msg or f"cannot write the post-hoc EMA snapshot of step {step} "
                                   f"(failed on the main process)")


def training_loss(run, batch):
    """Denoising loss of one batch under the LDM's prediction type (VAE encoding without gradients).

    --snr_gamma > 0: min-SNR-gamma weighted per sample; 0: the plain MSE (the numerics before the flag existed)."""
    acc, device = run.accelerator, run.device
    images = batch["image"].to(device, non_blocking=True)
    masks = batch["mask"].to(device, non_blocking=True)
    labels = batch["label"].to(device)
    with torch.no_grad(), acc.autocast():
        latents = encode(run.vae, images, run.ldm.scaling_factor).float()
    noise = torch.randn_like(latents)
    t = torch.randint(0, run.sched.config.num_train_timesteps, (latents.shape[0],), device=device)
    pred = run.model(run.sched.add_noise(latents, noise, t), t, labels, masks)
    target = training_target(run.sched, latents, noise, t).float()
    if run.args.snr_gamma > 0:
        per = F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1)
        return (per * min_snr_weights(run.sched, t, run.args.snr_gamma)).mean()
    return F.mse_loss(pred.float(), target)


def epoch_due(args, epoch):
    """Validation and checkpoints after this epoch (every --ckpt_every_epochs, and the last one)."""
    return (epoch + 1) % args.ckpt_every_epochs == 0 or epoch + 1 == args.num_epochs


def log_progress(run, log, step, epoch, losses, meter):
    """The periodic line: loss averaged over ranks and steps, lr, steps/s, images/s, memory (+ TensorBoard)."""
    avg = mean_over_ranks(torch.stack(losses).mean().item(), run.device)
    lr = run.lr_sched.get_last_lr()[0]
    steps_s, images_s = meter.rates()
    log.info(f"step {step} epoch {epoch} loss {avg:.5f} lr {lr:.2e} {steps_s:.2f} steps/s {images_s:.1f} images/s "
             f"mem {memory_mb(run.device):.0f} MiB")
    if run.writer:
        run.writer.add_scalar("train/loss", avg, step)
        run.writer.add_scalar("train/lr", lr, step)


def end_of_epoch(run, log, ds, epoch, nxt, step, best, done, train_idx, val_idx, last_good):
    """Validation, sample grid, checkpoint_last and (when better) checkpoint_best -> (best, last good)."""
    args, acc = run.args, run.accelerator
    if args.sample_steps and args.num_val_samples and acc.is_main_process and (
            done or (args.sample_every_epochs and (epoch + 1) % args.sample_every_epochs == 0)):
        write_sample_grid(run, log, ds, (val_idx or train_idx)[: args.num_val_samples], epoch, step)
    if not (done or epoch_due(args, epoch)):
        return best, last_good
    val = validate(run, ds, val_idx) if val_idx else None
    if val is not None:
        log.info(f"epoch {epoch} step {step} validation loss {val:.5f}")
        if run.writer:
            run.writer.add_scalar("val/loss", val, step)
    improved = val is not None and val < best
    best = val if improved else best
    score = val if val is not None else float("nan")
    last_good = save_checkpoint(run, LAST, *nxt, step, best, score)
    if improved or (val is None and (done or epoch + 1 == args.num_epochs)):
        save_checkpoint(run, BEST, *nxt, step, best, score)
        log.info(f"saved {BEST} (epoch {epoch}, "
                 f"{'val loss %.5f' % val if val is not None else 'no validation set: last epoch'})")
    return best, last_good


@torch.no_grad()
def validate(run, ds, val_idx):
    """Mean denoising loss on the held-out pairs with fixed noise (comparable across epochs, and across
    runs: never min-SNR weighted)."""
    # the unwrapped module: DDP forwards on uneven shards could wait on each other
    model, acc, sched, args = run.raw_model, run.accelerator, run.sched, run.args
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)  # private: the training RNG streams stay untouched
    total = torch.zeros(2, device=acc.device)
    mine = val_idx[acc.process_index::acc.num_processes]
    for i in range(0, len(mine), args.batch_size):
        items = [ds[j] for j in mine[i:i + args.batch_size]]
        images, masks, labels = (torch.stack([it[k] for it in items]).to(acc.device) for k in ("image", "mask", "label"))
        with acc.autocast():
            lat = encode(run.vae, images, run.ldm.scaling_factor, generator=gen).float()
        noise = torch.randn(lat.shape, generator=gen).to(lat.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=gen).to(lat.device)
        with acc.autocast():
            pred = model(sched.add_noise(lat, noise, t), t, labels, masks)
        per = F.mse_loss(pred.float(), training_target(sched, lat, noise, t).float(), reduction="none")
        per = per.mean(dim=(1, 2, 3))
        total += torch.stack([per.sum(), torch.tensor(float(len(items)), device=per.device)])
    if acc.num_processes > 1:
        total = acc.reduce(total, "sum")
    model.train()
    model.unet.train(not args.freeze_unet)
    return (total[0] / total[1]).item()


@torch.no_grad()
def write_sample_grid(run, log, ds, idx, epoch, step):
    """Rows of mask | sample (EMA ControlNet) | ground truth to TensorBoard and samples/epoch_XXXX.png."""
    from torchvision.utils import make_grid

    args, ldm, device, raw = run.args, run.ldm, run.device, run.raw_model
    items = [ds[j] for j in idx]
    masks = torch.stack([it["mask"] for it in items]).to(device)
    labels = torch.stack([it["label"] for it in items]).to(device)
    gt = torch.stack([it["image"] for it in items])
    sampler = make_sampler(args.sample_scheduler, ldm.noise_scheduler_config)
    lat, gens = initial_latents([args.seed + i for i in range(len(idx))],
                                (ldm.latent_channels, ldm.latent_size, ldm.latent_size))
    ema_model = type(raw)(raw.unet, run.ema.model, raw.encoder).eval()
    raw.unet.eval()
    x = sample(ema_model, sampler, lat.to(device), labels, masks, args.sample_steps, generators=gens)
    imgs = decode(run.vae, x, ldm.scaling_factor, ldm.image_channels).cpu()
    raw.train()
    raw.unet.train(not args.freeze_unet)
    c = max(gt.shape[1], masks.shape[1])
    rgb = (lambda x: x.expand(c, -1, -1) if x.shape[0] == 1 else x)  # 1-channel rows beside 3-channel ones
    rows = [rgb(t) for m, s, g in zip(masks.cpu(), imgs, gt) for t in (m * 2 - 1, s, g)]
    grid = make_grid(torch.stack(rows), nrow=3, padding=2, normalize=True, value_range=(-1, 1))
    if run.writer:
        run.writer.add_image("samples/mask|sample|ground_truth", grid, step)
    try:
        save_png_replace(to_pil((grid * 255).round().to(torch.uint8)), run.out / "samples" / f"epoch_{epoch:04d}.png")
    except TrainingError as e:  # a preview only: training goes on (a checkpoint write would stop it)
        log.warning(f"warning: {e}")
    animation.refresh_progress_gif(run.out / "samples", r"epoch_(\d+)\.png", "epoch", run.out / "progress.gif",
                                   upto=epoch, log=log)


if __name__ == "__main__":
    main()
