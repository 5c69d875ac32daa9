"""Session fixture of the fault suite: tiny assets, then every job (training runs, kills, sampling, the
bad-input drivers) started at once in background threads, at most FAULT_WORKERS (default 3) at a time.

Tests only read job results (`faults.get(name)`), so the suite's wall time is about that of its longest
chain rather than the sum of all runs. The kill delays come from FAULT_SEED (printed in the summary).
"""
import json
import os
import re
import shutil
import signal
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fault_lib as fl
from fault_specs import ALL_CASES, FOLDERS, SAMPLERS, TRAINERS


# ------------------------------------------------------------------ training jobs
def ref_job(T, a, work):
    """An uninterrupted run: the reference for resume, and the checkpoints the other jobs use."""
    out = work / f"{T.name}_ref"
    fl.run(T.folder, T.args(a, out), work / "logs", f"{T.name}_ref")
    ck = T.ckpt(out)
    return {"out": out, "ckpt": ck, "step": fl.load(ck)[T.step_key]}


def chain_job(T, a, work):
    """fresh run -SIGTERM-> resume -random SIGKILL-> resume -SIGKILL inside a checkpoint write-> resume to the end.

    Each stage records what happened (exit codes, logs, checkpoint steps and hashes); the tests in
    test_faults_training.py assert on those records. A stage runs only while the run folder still holds
    a checkpoint to resume; one that could not run says why in its "skipped" field."""
    out, logs, rng = work / f"{T.name}_chain", work / "logs", fl.rng_for(f"{T.name}.chain")
    st = {}

    def stage(name, fn):
        blocked = [k for k, v in st.items() if v.get("skipped") or v.get("error")]
        if blocked:
            st[name] = {"skipped": f"not run: the earlier stage {blocked[0]} could not complete"}
            return
        try:
            st[name] = fn()
        except Exception:  # noqa: BLE001 - recorded; the test names it
            st[name] = {"error": traceback.format_exc()}

    def ckpt_step():
        path = T.ckpt(out)
        return fl.load(path)[T.step_key] if path is not None and path.exists() else None

    def sigterm():
        p = fl.Proc(T.folder, T.args(a, out), logs, f"{T.name}_chain1_sigterm")
        fl.wait_until(lambda: T.signature(out), p, "the first checkpoint")
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        alive = p.alive()
        if alive:
            p.kill(signal.SIGTERM)
        code = p.wait()
        return {"delay": delay, "alive": alive, "code": code, "stderr": p.stderr, "tail": p.tail(),
                "logged_step": fl.sigterm_step(p.stdout), "ckpt_step": ckpt_step()}

    def sigkill():
        sig0 = T.signature(out)
        p = fl.Proc(T.folder, T.args(a, out) + T.resume, logs, f"{T.name}_chain2_sigkill")
        fl.wait_until(lambda: T.signature(out) != sig0, p, "a checkpoint of the resumed run")
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        alive = p.alive()
        if alive:
            p.kill()
        code = p.wait()
        return {"delay": delay, "alive": alive, "code": code, "tail": p.tail(), "ckpt_step": ckpt_step()}

    def kill_in_save():
        path = T.ckpt(out)
        before, step = fl.sha(path), fl.load(path)[T.step_key]
        p = fl.Proc(T.folder, T.args(a, out) + T.resume, logs, f"{T.name}_chain3_kill_in_save",
                    env={"FAULT_KILL_IN_SAVE": T.save_match}, boot=True)
        code = p.wait()
        m = re.search(r"FAULT-HOOK: SIGKILL while writing (\S+)", p.stderr)
        return {"code": code, "partial": m and m.group(1), "tail": p.tail(), "path": str(path),
                "latest": str(T.ckpt(out)), "sha_before": before, "sha_after": fl.sha(path), "step": step,
                "step_after": fl.load(path)[T.step_key]}

    def final():
        p = fl.run(T.folder, T.args(a, out) + T.resume, logs, f"{T.name}_chain4_final", expect=None)
        return {"code": p.p.returncode, "tail": p.tail(), "final": str(T.ckpt(out))}

    stage("sigterm", sigterm)
    stage("sigkill", sigkill)
    stage("kill_in_save", kill_in_save)
    stage("final", final)
    return {"out": out, "stages": st}


def copy_run(T, src_out, dst_out):
    """Copy a finished run so that it can be resumed elsewhere (DiT: only its latest checkpoint)."""
    if T.name == "dit":
        ck = T.ckpt(src_out)
        (dst_out / ck.parent.relative_to(src_out)).mkdir(parents=True)
        shutil.copy2(ck, dst_out / ck.relative_to(src_out))
    else:
        shutil.copytree(src_out, dst_out)
    return T.ckpt(dst_out)


def ckpt_listing(T, out):
    d = T.ckpt(out).parent
    return sorted(p.name for p in d.iterdir())


def disk_job(T, a, work, ref):
    """Resume the finished reference on a nearly full disk (tiny tmpfs, 48 KB free): the next checkpoint fails.

    Returns what happened (exit code, stderr, the checkpoint's hash before and after); the test asserts.
    Without permission to mount a tmpfs the job says so and the test is skipped with that reason: an
    unwritable folder is another fault (chmod does not stop root), not a full disk."""
    mnt = work / f"{T.name}_disk"
    size = sum(p.stat().st_size for p in ref["out"].rglob("*") if p.is_file()) if T.name != "dit" else \
        T.ckpt(ref["out"]).stat().st_size
    with fl.tiny_disk(mnt, size + (3 << 20)) as kind:
        if kind is None:
            return {"skip": "full disk not tested: `mount -t tmpfs` was refused on this machine (it needs root "
                            "or CAP_SYS_ADMIN), so no small file system could be filled"}
        dst = mnt / "out"
        path = copy_run(T, ref["out"], dst)
        fl.fill_disk(mnt, 48 << 10)
        before = fl.sha(path)
        p = fl.run(T.folder, T.args(a, dst, T.epochs + 1) + T.resume, work / "logs", f"{T.name}_disk",
                   expect=None)
        after = fl.sha(path)
        try:
            fl.load(path)
            loadable = True
        except Exception:  # noqa: BLE001
            loadable = False
        return {"kind": kind, "code": p.p.returncode, "stderr": p.stderr, "tail": p.tail(), "path": str(path),
                "sha_before": before, "sha_after": after, "loadable": loadable}


# ------------------------------------------------------------------ sampling jobs
def pngs(out):
    return [f for f in fl.visible_files(out) if f.endswith(".png")]


def snapshot(out):
    """{relative png path: (inode, mtime_ns, size)}."""
    return {f: ((out / f).stat().st_ino, (out / f).stat().st_mtime_ns, (out / f).stat().st_size) for f in pngs(out)}


def describe_outputs(out):
    """PNG hashes, the PNGs that do not decode, other visible files, and leftover hidden files."""
    files, broken = {}, []
    for f in pngs(out):
        try:
            with Image.open(out / f) as im:
                im.load()
        except Exception:  # noqa: BLE001 - recorded; the tests assert there is none
            broken.append(f)
        files[f] = fl.sha(out / f)
    other = {}
    for f in fl.visible_files(out):
        if f.endswith(".npz"):
            with np.load(out / f) as z:
                other[f] = {k: fl.hashlib.sha256(z[k].tobytes()).hexdigest() for k in z.files}
        elif not f.endswith(".png"):
            other[f] = (out / f).read_text(errors="replace")
    return {"files": files, "broken": broken, "other": other, "hidden": fl.hidden_files(out)}


def sample_kill_job(S, a, work):
    """Kill sampling after its first image, rerun the same command; record what was there and what changed."""
    out, rng = work / f"{S.name}_killed", fl.rng_for(f"{S.name}.kill")
    p = fl.Proc(S.folder, S.make_args(a, out), work / "logs", f"{S.name}_killed")
    fl.wait_until(lambda: len(pngs(out)) >= 1, p, "the first image")
    delay = rng.uniform(0.0, 0.05)
    time.sleep(delay)
    alive = p.alive()
    if alive:
        p.kill()
    p.wait()
    present = snapshot(out)
    rerun = fl.run(S.folder, S.make_args(a, out), work / "logs", f"{S.name}_rerun", expect=None)
    after = snapshot(out)
    return {"alive": alive, "present": len(present), "delay": delay, "rerun_code": rerun.p.returncode,
            "rewritten": [f for f, v in present.items() if after.get(f) != v], **describe_outputs(out),
            "log": rerun.tail()}


def sample_concurrent_job(S, a, work):
    """Two runs of the same command started at once into one folder."""
    out = work / f"{S.name}_concurrent"
    procs = [fl.Proc(S.folder, S.make_args(a, out), work / "logs", f"{S.name}_concurrent{i}") for i in (1, 2)]
    codes = [p.wait() for p in procs]
    return {"codes": codes, "tails": [p.tail() for p in procs], **describe_outputs(out)}


# ------------------------------------------------------------------ bad-input drivers
def build_cases(folder, a, work, refs):
    """Resolve the templates of one folder's cases; prepare their setups; snapshot the output folders."""
    root = work / "cases"
    ctx = {k: str(v) for k, v in a.items() if isinstance(v, (str, Path))}
    for group, prefix in (("variants", ""), ("pvariants", "p_"), ("mvariants", "m_")):
        ctx.update({prefix + k: str(v) for k, v in a[group].items()})
    cases = []
    for case in ALL_CASES:
        if case["folder"] != folder:
            continue
        cid = case["id"]
        c = dict(ctx, out=str(root / "out" / cid), evil=str(root / "evil" / f"{cid}.pt"))
        marker = root / "markers" / cid
        marker.parent.mkdir(parents=True, exist_ok=True)
        fl.write_pickle_bomb(c["evil"], marker)
        setup = case["setup"] or ""
        out = Path(c["out"])
        if setup.startswith("ddpm_state:"):
            src = setup.split(":")[1]
            dst = out / "models" / "DDPM_conditional" / "train_state.pt"
            dst.parent.mkdir(parents=True)
            if src == "text":
                shutil.copy(a["text"], dst)
            elif src == "evil":
                fl.write_pickle_bomb(dst, marker, "ddpm")
            else:
                shutil.copy(a["ldm_ckpt"] if src == "ldm" else a["ddpm_state"], dst)
        elif setup.startswith("ddpm_cdir:"):
            src = setup.split(":")[1]
            cdir = root / "cdirs" / cid
            cdir.mkdir(parents=True)
            cfg = json.loads((Path(a["ddpm_ckpt"]).parent / "config.json").read_text())
            if src == "othersize":
                cfg["model"]["base_channels"] *= 2
                shutil.copy(a["ddpm_ckpt"], cdir / "ckpt.pt")
            elif src == "text":
                shutil.copy(a["text"], cdir / "ckpt.pt")
            elif src == "evil":
                fl.write_pickle_bomb(cdir / "ckpt.pt", marker, "ddpm")
            else:
                shutil.copy(a["ldm_ckpt"], cdir / "ckpt.pt")
            (cdir / "config.json").write_text(json.dumps(cfg))
            c["cdir_ckpt"] = str(cdir / "ckpt.pt")
        elif setup == "evil_vae":
            vdir = root / "evil_vae" / cid
            vdir.mkdir(parents=True)
            shutil.copy(Path(a["vae2"]) / "config.json", vdir / "config.json")
            torch.save({"encoder.conv_in.weight": fl.PickleBomb(marker)}, vdir / "diffusion_pytorch_model.bin")
            c["evil_vae"] = str(vdir)
        elif setup == "cn_resume":
            out.mkdir(parents=True)
            shutil.copy(refs["controlnet"]["ckpt"], out / "checkpoint_last.pt")
        if folder == "evaluation":
            out.mkdir(parents=True)
        args = [s.format(**c) for s in case["args"]]
        cases.append(dict(case, args=args, out=str(out), marker=str(marker), before=fl.tree_state(out),
                          names=[n.format(**c) for n in case["names"]]))
    for T in TRAINERS.values():  # NaN loss: resume the finished reference for one more epoch, NaN at once
        if T.folder != folder:
            continue
        out, ref = root / "out" / f"{T.name}-nan-loss", refs[T.name]
        path = copy_run(T, ref["out"], out)
        args = [str(x) for x in T.args(a, out, T.epochs + 1) + T.resume]
        cases.append(dict(id=f"{T.name}-nan-loss", script=args[0], args=args[1:], marker=None, step=ref["step"],
                          env={"DIFFUSION_FAULT_NAN_AT_STEP": str(ref["step"] + 1)}, ckpt=str(path),
                          sha=fl.sha(path), listing=ckpt_listing(T, out)))
    return cases


def driver_job(folder, a, work, refs):
    cases = build_cases(folder, a, work, refs)
    cfile, rfile = work / "cases" / f"{folder}.json", work / "cases" / f"{folder}.results.json"
    cfile.write_text(json.dumps([{k: c.get(k) for k in ("id", "script", "args", "marker", "env")} for c in cases]))
    p = fl.run(folder, [str(fl.DRIVER), str(cfile), str(rfile)], work / "logs", f"{folder}_driver", expect=None)
    results = json.loads(rfile.read_text()) if rfile.exists() else {}
    return {"cases": {c["id"]: c for c in cases}, "results": results, "driver": p.tail()}


# ------------------------------------------------------------------ the session fixture
def ldm_assets(a, refs, work):
    """The LDM checkpoint ControlNet trains on, and an LDM of another size (for mismatch errors)."""
    from diffusers import UNet2DConditionModel
    src = refs["ldm"]["out"] / "checkpoint_best.pt"
    a["ldm_for_cn"] = work / "assets_ldm" / "ldm_for_cn.pt"
    a["ldm_for_cn"].parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, a["ldm_for_cn"])
    ck = fl.load(src)
    cfg = dict(ck["unet_config"])
    cfg["block_out_channels"] = [2 * c for c in cfg["block_out_channels"]]
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(cfg)
    ck.update(unet_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items()},
              unet=unet.state_dict(), ema_unet=unet.state_dict())
    a["ldm_big"] = work / "assets_ldm" / "ldm_big.pt"
    torch.save(ck, a["ldm_big"])


class Faults:
    def __init__(self, work):
        self.work = work
        self.a = fl.make_assets(work / "assets")
        self.jobs = fl.Jobs(int(os.environ.get("FAULT_WORKERS", "3")))
        self.refs = {}
        a, J = self.a, self.jobs

        def ref(name):
            def fn():
                r = ref_job(TRAINERS[name], a, work)
                self.refs[name] = r
                if name == "ddpm":
                    a["ddpm_ckpt"] = r["out"] / "models" / "DDPM_conditional" / "ckpt.pt"
                    a["ddpm_state"] = r["ckpt"]
                elif name == "ldm":
                    a["ldm_ckpt"] = r["ckpt"]
                    ldm_assets(a, self.refs, work)
                elif name == "vae":
                    a["vae_state"] = r["ckpt"]
                elif name == "dit":
                    a["dit_ckpt"] = r["ckpt"]
                    cp = work / "assets_dit" / "000-DiT-Ti-2" / "checkpoints" / r["ckpt"].name
                    cp.parent.mkdir(parents=True)
                    shutil.copy(r["ckpt"], cp)
                    a["dit_ckpt_copy"] = cp
                elif name == "controlnet":
                    a["cn_ckpt"] = r["out"] / "checkpoint_best.pt"
                return r
            return fn

        dep = {"controlnet": ("ldm.ref",)}
        order = ("ldm", "dit", "ddpm", "vae", "controlnet")
        for n in order:
            J.add(f"{n}.ref", ref(n), dep.get(n, ()))
        for n in order:
            J.add(f"{n}.chain", lambda n=n: chain_job(TRAINERS[n], a, work), dep.get(n, ()))
        for s, S in SAMPLERS.items():
            J.add(f"{s}.concurrent", lambda S=S: sample_concurrent_job(S, a, work), (f"{S.ref}.ref",) + dep.get(S.ref, ()))
            J.add(f"{s}.kill", lambda S=S: sample_kill_job(S, a, work), (f"{S.ref}.ref",) + dep.get(S.ref, ()))
        all_refs = tuple(f"{n}.ref" for n in order)
        for f in FOLDERS:
            J.add(f"{f}.inputs", lambda f=f: driver_job(f, a, work, self.refs), all_refs)
        for n in order:
            J.add(f"{n}.disk", lambda n=n: disk_job(TRAINERS[n], a, work, self.refs[n]), (f"{n}.ref",))

    def get(self, name):
        return self.jobs.get(name)


@pytest.fixture(scope="session")
def faults(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    f = Faults(work)
    yield f
    for t in f.jobs.threads.values():  # let running jobs finish before pytest removes their folders
        t.join(timeout=900)
    if os.environ.get("FAULT_KEEP"):  # keep logs and outputs; times.tsv: wall and CPU seconds per process
        (work / "times.tsv").write_text("".join(f"{t}\t{w}\t{c}\n" for t, w, c in sorted(fl.TIMES, key=lambda x: -x[2])))
        print(f"\nfault suite work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)  # DiT checkpoints take hundreds of MB
