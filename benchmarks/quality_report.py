"""Figures derived from the quality part's FD curves: steps to a target FD, the text table, the PNG plot.

Not run directly; `part_quality.py` calls it. Pure Python + PIL (matplotlib is not installed here, and a plot
of a few curves does not justify the dependency), so the tests import it without a model folder.
"""
import math

from PIL import Image, ImageDraw, ImageFont


def steps_to_target(steps, fds, target):
    """First step at which the FD curve reaches `target` (FD <= target), linear between checkpoints.

    Returns (steps or None, upper_bound). Checkpoints whose FD is missing (None/NaN) are skipped. When the
    first evaluated checkpoint is already at or below the target the curve before it is unknown (no FD at
    step 0), so that checkpoint's step is returned as an upper bound (upper_bound True)."""
    pts = [(float(s), float(f)) for s, f in zip(steps, fds) if f is not None and math.isfinite(f)]
    if not pts or target is None or not math.isfinite(target):
        return None, False
    if pts[0][1] <= target:
        return pts[0][0], True
    for (s0, f0), (s1, f1) in zip(pts, pts[1:]):
        if f1 <= target:
            return s0 + (f0 - target) / (f0 - f1) * (s1 - s0), False
    return None, False


def accepts(help_text, flag):
    """True when a script's --help lists the flag (in either spelling)."""
    return flag in help_text or flag.replace("_", "-") in help_text


def missing_flag(needs, sampler_word, train_help, sample_help):
    """None when the folder accepts a variant's training flags and sampler, else its "n/a (flag missing: ...)" status."""
    missing = [f for f in needs if not accepts(train_help, f)]
    if sampler_word and sampler_word not in sample_help:
        missing.append(f"--sampler {sampler_word}")
    return f"n/a (flag missing: {', '.join(missing)})" if missing else None


def add_steps_to_target(family):
    """Fill each variant's steps to the baseline's final FD and its ratio to the baseline's steps (in place)."""
    base = family["variants"][0]
    curve = [c["fd"] for c in base.get("checkpoints", [])]
    target = curve[-1] if curve and len(curve) == len(family["steps"]) else None
    family["target_fd"] = target
    total = family["steps"][-1]
    best = None
    for v in family["variants"]:
        fds = [c["fd"] for c in v.get("checkpoints", [])]
        n, bound = steps_to_target([c["step"] for c in v.get("checkpoints", [])], fds, target)
        v["steps_to_target"], v["steps_to_target_upper_bound"] = n, bound
        v["ratio_to_baseline"] = None if n is None else n / total
        if v is not base and v["ratio_to_baseline"] is not None and (best is None or v["ratio_to_baseline"] <
                                                                     best["ratio"]):
            best = {"variant": v["name"], "ratio": v["ratio_to_baseline"], "upper_bound": bound}
    family["best_ratio"] = best
    return family


def _num(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def family_table(family):
    """Lines of one family's table: FD / class accuracy per checkpoint, steps to the target, ratio, s/step."""
    steps = family["steps"]
    lines = [family["title"]]
    target = family.get("target_fd")
    reach = f"steps to FD {_num(target, '.1f')}"
    hdr = f"{'variant':<30}" + "".join(f"{'@' + str(s):>15}" for s in steps) + f"{reach:>21}{'ratio':>8}{'s/step':>8}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for v in family["variants"]:
        name = v["name"] + (" (baseline)" if v is family["variants"][0] else "")
        if v["status"] != "ok" and not v.get("checkpoints"):
            lines.append(f"{name[:30]:<30}{v['status']}")
            continue
        by_step = {c["step"]: c for c in v.get("checkpoints", [])}
        cells = []
        for s in steps:
            c = by_step.get(s)
            cells.append(f"{_num(c and c['fd'], '.1f') + ' / ' + _num(c and c['class_accuracy'], '.2f'):>15}")
        n = v.get("steps_to_target")
        reached = "not reached" if n is None else ("<= " if v.get("steps_to_target_upper_bound") else "") + f"{n:.0f}"
        ratio = v.get("ratio_to_baseline")
        ratio = "-" if ratio is None else ("<=" if v.get("steps_to_target_upper_bound") else "") + f"{ratio:.2f}"
        lines.append(f"{name[:30]:<30}{''.join(cells)}{reached:>21}{ratio:>8}{_num(v.get('seconds_per_step'), '.3f'):>8}")
        if v["status"] != "ok":
            lines.append(f"{'':<30}{v['status']}")
    lines.append(f"(cells: FD / class accuracy at that step; ratio: steps to the baseline's final FD / the baseline's "
                 f"{steps[-1]} steps; s/step: training wall time incl. start-up)")
    return lines


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def plot(families, path, floor=None, width=560, height=380):
    """FD against training steps, one panel per family, one line per variant; written with PIL."""
    fams = [f for f in families if any(v.get("checkpoints") for v in f["variants"])]
    img = Image.new("RGB", (width * max(1, len(fams)), height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for k, fam in enumerate(fams):
        ox = k * width
        left, right, top, bottom = ox + 58, ox + width - 16, 30, height - 110
        curves = [(v, [(c["step"], c["fd"]) for c in v["checkpoints"] if c["fd"] is not None and math.isfinite(c["fd"])])
                  for v in fam["variants"] if v.get("checkpoints")]
        values = [f for _, pts in curves for _, f in pts] + ([floor] if floor else [])
        y_max = max(values) * 1.05 if values else 1.0
        x_max = fam["steps"][-1]

        def xy(s, f):
            return left + (right - left) * s / x_max, bottom - (bottom - top) * f / y_max

        draw.text((ox + 10, 8), fam.get("short_title", fam["title"])[:88], fill="black", font=font)
        draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
        for i in range(5):
            fy = y_max * i / 4
            _, y = xy(0, fy)
            draw.line([(left - 4, y), (left, y)], fill="black")
            draw.text((ox + 4, y - 6), f"{fy:.0f}", fill="black", font=font)
        for s in fam["steps"]:
            x, _ = xy(s, 0)
            draw.line([(x, bottom), (x, bottom + 4)], fill="black")
            draw.text((x - 12, bottom + 6), str(s), fill="black", font=font)
        draw.text(((left + right) / 2 - 30, bottom + 20), "training steps", fill="black", font=font)
        draw.text((ox + 4, top - 14), "FD", fill="black", font=font)
        target = fam.get("target_fd")
        if target is not None:
            _, y = xy(0, target)
            for x in range(int(left), int(right), 8):
                draw.line([(x, y), (x + 4, y)], fill=(120, 120, 120))
        if floor:
            _, y = xy(0, floor)
            for x in range(int(left), int(right), 12):
                draw.line([(x, y), (x + 2, y)], fill=(0, 0, 0))
        for j, (v, pts) in enumerate(curves):
            col = PALETTE[j % len(PALETTE)]
            pix = [xy(s, f) for s, f in pts]
            if len(pix) > 1:
                draw.line(pix, fill=col, width=2)
            for x, y in pix:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
            ly = bottom + 36 + 12 * j
            draw.line([(left, ly + 5), (left + 18, ly + 5)], fill=col, width=2)
            draw.text((left + 24, ly), v["name"][:70], fill="black", font=font)
        note = "grey dashes: baseline's final FD" + ("; black dots: FD of real training digits" if floor else "")
        draw.text((left, height - 14), note, fill=(90, 90, 90), font=font)
    img.save(path)
    return path
