#!/usr/bin/env python3
"""Build a benchmark catalogue of real photos, its held-out queries and their answers.

Deterministic given the package versions (samples/install_photo_sources.sh,
samples/requirements-photos.txt) and --seed. Writes to OUT (never into the repository):

  catalogue/      N images (default 5,000; --small: 500), named c00001.jpg ... in a
                  shuffled order. Each is a rectangular region of one source photo (at
                  most WORKING_LONG_SIDE px): the photo is cut by random guillotine cuts
                  and regions are taken only where an ORB detector has something to find
                  (>= MIN_CORNERS FAST corners), so regions of one photo never share a
                  pixel and a copy of a catalogue image has exactly one right answer.
                  Each is then maybe mirrored, recoloured (hue, saturation, gamma, grey,
                  white balance), resized (320-2000 px on the long side; smaller regions
                  are upscaled, as catalogues do) and encoded (JPEG q75-95 mostly, some
                  q60-74, PNG and WebP). About 5 % are the hard cases real catalogues
                  have: heavily blurred, dark, foggy (low contrast), tiny (100-200 px),
                  regions with no texture (sky, bokeh, walls), product shots on a plain
                  background, smooth gradients.
  queries/        attacked copies of a random subset of catalogue images, named
                  `<catalogue stem>__<attack>.jpg` (the convention of the indexer's image
                  bench and of indexer/bench/annoy_baseline.py), and distractors named
                  `distractor__<n>.jpg` that share no pixel with the catalogue (held-out
                  photos, and held-out regions of catalogue photos).
  truth.json      per query: its catalogue answer (or null), attack and parameters;
  truth.csv       the same, flat.
  manifest.json   per catalogue image: source package, version, file, licence, credit,
                  region, every derivation step, size, format, texture score, ORB count.
  sources.json    per source photo: licence, how many images it gave, and why it was
                  left out if it was (overlap with another source, held out).
  stats.json      counts per source package / kind / attack / format, resolutions, bytes,
                  ORB keypoints per catalogue image (cv2.ORB_create(1000)), timings.

Usage:
    samples/install_photo_sources.sh
    /var/cache/imageindex/photos-venv/bin/python samples/make_photo_catalogue.py OUT [--small]

Source photos that show the same thing (one photo shipped twice, different photos of a
landmark from the same spot, overlapping sky fields) would give a query two right
answers: every pair of sources is compared with ORB matches verified by a RANSAC
homography, and the smaller of any overlapping pair is left out. That audit takes
minutes, so its result is checked in (samples/photo_source_overlaps.json) and only
sources it has not seen are audited again (--run-audit redoes all of it).
"""
import argparse
import csv
import heapq
import io
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections import Counter, defaultdict
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import photo_sources  # noqa: E402

GENERATOR_VERSION = 1

# Catalogue layout (pixels of a source's working image, see working_image()).
WORKING_LONG_SIDE = 4096
CELL = 16                      # regions are placed on a grid of CELL x CELL cells
MIN_REGION_SIDE = 140
MIN_REGION_AREA = 150 * 160
MAX_ASPECT = 3.0
FAST_THRESHOLD = 20            # ORB's own FAST threshold
MIN_CORNERS = 60               # FAST corners a region needs (else it is a low-texture one)
AREA_EXPONENT = 0.8            # < 1: large photos give fewer, larger images
MAX_ASTRO_SOURCES = 300
MAX_REGIONS_PER_KIND = {"astro": 3}
MAX_LONG_SIDE = 2000
MIN_LONG_SIDE = 320
MAX_UPSCALE = 2.2
HARD_SHARES = {                # share of the catalogue made into each hard case
    "blurred": 0.007, "dark": 0.007, "foggy": 0.007, "tiny": 0.007,   # derived from photos
    "low_texture": 0.007,      # natural: a region with no corners (sky, bokeh, a wall)
    "gradient": 0.006,         # regions of the plain graphics (smooth gradients)
}                              # (+ the product shots on white, ~0.8 %, from their source)
DERIVED_HARD = ["blurred", "dark", "foggy", "tiny"]
HELD_OUT_SOURCES = 30          # whole photos kept out of the catalogue, for distractors
                               # (and for backgrounds of the "framed" queries)
HELD_OUT_REGIONS = 20          # regions of catalogue photos kept out, for distractors

# Queries: the attacks (names, parameter ranges) differ on purpose from indexer/src/attacks.rs.
ATTACKS = [
    "crop", "crop_heavy", "rotate_small", "rotate_right", "scale_down", "jpeg_heavy",
    "perspective", "framed", "gray_blur", "mirror_crop", "photometric", "recolour",
    "crop_rotate_jpeg", "scale_blur_jpeg", "mirror_photometric_jpeg", "perspective_crop_jpeg",
    "rotate_right_scale_jpeg",
]
NEEDS_BIG = {"crop_heavy", "scale_down", "scale_blur_jpeg", "rotate_right_scale_jpeg"}

_SOURCES = None  # per worker: {id: Source}


def stable_seed(*parts):
    """A 64-bit seed from strings/ints, independent of PYTHONHASHSEED."""
    h = 0
    for p in parts:
        h = zlib.crc32(str(p).encode(), h)
        h = (h * 0x9E3779B1 + len(str(p))) & 0xFFFFFFFFFFFF
    return h


def rng_for(*parts):
    return np.random.default_rng(stable_seed(*parts))


def init_worker(root):
    global _SOURCES
    cv2.setNumThreads(1)
    _SOURCES = {s.id: s for s in photo_sources.discover(root)}


# --------------------------------------------------------------------------- source audit

AUDIT_PARAMS = {"max_side": 640, "features": 400, "ratio": 0.8, "min_matches": 8,
                "min_inliers": 10, "min_inlier_share": 0.2, "ransac_px": 6.0}
DEFAULT_AUDIT = Path(__file__).resolve().parent / "photo_source_overlaps.json"


def orb_signature(sid):
    """(id, keypoints xy, descriptors) of a source at AUDIT_PARAMS' size and feature count."""
    rgb, _ = _SOURCES[sid].load()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    f = min(1.0, AUDIT_PARAMS["max_side"] / max(gray.shape))
    if f < 1:
        gray = cv2.resize(gray, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    kps, des = cv2.ORB_create(AUDIT_PARAMS["features"]).detectAndCompute(gray, None)
    if des is None:
        return sid, np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    return sid, np.float32([k.pt for k in kps]), des


def match_chunk(args):
    """Ratio-test matches of the query rows `rows` against all descriptors, other sources only."""
    rows, des, owner = args
    bf = cv2.BFMatcher(cv2.NORM_HAMMING)
    out = []
    for c0 in range(0, len(rows), 4096):
        sel = rows[c0:c0 + 4096]
        for m in bf.knnMatch(des[sel], des, k=8):
            if not m:
                continue
            qi = int(sel[m[0].queryIdx])
            mine = owner[qi]
            others = [x for x in m if owner[x.trainIdx] != mine]
            if not others or others[0].distance > 64:
                continue
            best = others[0]
            # the ratio test against the nearest descriptor of a THIRD source, so that
            # repeated structures inside the matching source do not hide the match
            third = [x for x in others if owner[x.trainIdx] != owner[best.trainIdx]]
            if (third and best.distance < AUDIT_PARAMS["ratio"] * third[0].distance) \
                    or (not third and best.distance <= 48):
                out.append((qi, best.trainIdx))
    return out


def audit_sources(srcs, pool, workers, only=None):
    """Every pair of sources with at least min_matches ratio-test matches:
    [(a, b, matches, RANSAC inliers)] (overlapping() says which of them show the same content).
    With `only` (ids), just the pairs that involve one of those sources."""
    sigs = pool.map(orb_signature, [s.id for s in srcs], chunksize=4)
    index = {sid: i for i, (sid, _, _) in enumerate(sigs)}
    des = np.concatenate([d for _, _, d in sigs]) if sigs else np.zeros((0, 32), np.uint8)
    pts = np.concatenate([p for _, p, _ in sigs])
    owner = np.concatenate([np.full(len(d), index[sid]) for sid, _, d in sigs])
    rows = np.arange(len(des))
    if only is not None:
        rows = rows[np.isin(owner, [index[sid] for sid in only if sid in index])]
    step = max(1, math.ceil(len(rows) / (workers * 8)))
    chunks = [(rows[lo:lo + step], des, owner) for lo in range(0, len(rows), step)]
    pairs = defaultdict(list)
    for part in pool.imap(match_chunk, chunks):
        for qi, ti in part:
            a, b = owner[qi], owner[ti]
            key = (a, b) if a < b else (b, a)
            pairs[key].append((qi, ti) if a < b else (ti, qi))
    found = []
    for (a, b), ms in sorted(pairs.items()):
        if len(ms) < AUDIT_PARAMS["min_matches"]:
            continue
        ms = list(dict.fromkeys(ms))
        src_pts = pts[[m[0] for m in ms]]
        dst_pts = pts[[m[1] for m in ms]]
        cv2.setRNGSeed(stable_seed(a, b) & 0x7FFFFFFF)
        h, mask = cv2.findHomography(src_pts, dst_pts, cv2.RANSAC, AUDIT_PARAMS["ransac_px"],
                                     maxIters=4000, confidence=0.999)
        inl = int(mask.sum()) if h is not None and mask is not None else 0
        found.append((sigs[a][0], sigs[b][0], len(ms), inl))
    return found


def overlapping(candidates):
    """The audited pairs that show the same content: [(a, b, inliers)]."""
    return [(a, b, inl) for a, b, n, inl in candidates
            if inl >= AUDIT_PARAMS["min_inliers"] and inl >= AUDIT_PARAMS["min_inlier_share"] * n]


def source_overlaps(srcs, pool, args, out):
    """The audit's overlapping pairs: from --audit-file when it covers exactly these sources
    with these parameters (the checked-in samples/photo_source_overlaps.json does), else
    run now (minutes) and write OUT/photo_source_overlaps.json."""
    ids = sorted(s.id for s in srcs)
    old, audited = [], set()
    if args.audit_file.exists() and not args.run_audit:
        doc = json.loads(args.audit_file.read_text())
        if doc.get("params") == AUDIT_PARAMS:
            audited = set(doc["audited"])
            old = [tuple(c) for c in doc["candidates"]]
    here = set(ids)
    old = [c for c in old if c[0] in here and c[1] in here]
    new = sorted(here - audited)
    if not new:
        return overlapping(old)
    print(f"auditing {len(new)} sources not in {args.audit_file.name} against all {len(ids)}",
          file=sys.stderr)
    candidates = old + audit_sources(srcs, pool, args.workers, only=None if not audited else new)
    doc = {"params": AUDIT_PARAMS, "opencv": cv2.__version__, "audited": sorted(audited | here),
           "candidates": [list(c) for c in candidates]}
    (out / "photo_source_overlaps.json").write_text(json.dumps(doc) + "\n")
    return overlapping(candidates)


def cap_astro(srcs):
    """(sources, {id: reason}): at most MAX_ASTRO_SOURCES nebula photos, a fixed random
    choice (part of the curation, like the lists in photo_sources.py, so not --seed's)."""
    astro = [s.id for s in srcs if s.kind == "astro" and s.package == "stellarium-data"]
    if len(astro) <= MAX_ASTRO_SOURCES:
        return srcs, {}
    keep = set(rng_for("astro-cap").choice(astro, MAX_ASTRO_SOURCES, replace=False).tolist())
    dropped = {sid: f"astro cap ({MAX_ASTRO_SOURCES} nebula photos)" for sid in astro if sid not in keep}
    return [s for s in srcs if s.id not in dropped], dropped


def drop_overlapping(srcs, overlaps):
    """(kept, {id: reason}): the smaller source of each overlapping pair is left out."""
    size = {s.id: s.width * s.height for s in srcs}
    dropped = {}
    for a, b, inl in sorted(overlaps, key=lambda t: (-t[2], t[0], t[1])):
        if a in dropped or b in dropped:
            continue
        small, big = (a, b) if (size[a], a) < (size[b], b) else (b, a)
        dropped[small] = f"shows the same content as {big} ({inl} RANSAC inliers)"
    return [s for s in srcs if s.id not in dropped], dropped


# --------------------------------------------------------------------------- layout

def working_image(src):
    """(RGB, alpha or None) of a source at its working size: long side <= WORKING_LONG_SIDE.
    Regions are cut from this image (so their coordinates are in its pixels)."""
    rgb, alpha = src.load()
    f = min(1.0, WORKING_LONG_SIDE / max(rgb.shape[:2]))
    if f < 1:
        size = (int(round(rgb.shape[1] * f)), int(round(rgb.shape[0] * f)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        if alpha is not None:
            alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
    return rgb, alpha


def corner_map(sid):
    """(id, (width, height), FAST corners per CELL x CELL cell) of a source's working image:
    where an ORB detector will find something (sky, bokeh and walls have no corners)."""
    rgb, _ = working_image(_SOURCES[sid])
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    grid = np.zeros((h // CELL, w // CELL), np.int32)
    for kp in cv2.FastFeatureDetector_create(FAST_THRESHOLD).detect(gray, None):
        cx, cy = int(kp.pt[0]) // CELL, int(kp.pt[1]) // CELL
        if cy < grid.shape[0] and cx < grid.shape[1]:
            grid[cy, cx] += 1
    return sid, (w, h), grid


def split_regions(width, height, count, rng):
    """Up to `count` disjoint rectangles (x, y, w, h) tiling the image: guillotine cuts at
    random positions (30-70 %), the rectangle to cut picked with probability ~ its area,
    no side under MIN_REGION_SIDE; overlong strips are trimmed to MAX_ASPECT."""
    rects = [(0, 0, width, height)]
    tries = 0
    while len(rects) < count and tries < 50 * count:
        tries += 1
        areas = np.array([w * h for _, _, w, h in rects], float)
        i = int(rng.choice(len(rects), p=areas / areas.sum()))
        x, y, w, h = rects[i]
        vertical = w > h if max(w, h) > 1.6 * min(w, h) else rng.random() < w / (w + h)
        frac = rng.uniform(0.3, 0.7)
        if vertical:
            a = int(round(w * frac))
            parts = [(x, y, a, h), (x + a, y, w - a, h)]
        else:
            a = int(round(h * frac))
            parts = [(x, y, w, a), (x, y + a, w, h - a)]
        if all(min(pw, ph) >= MIN_REGION_SIDE and pw * ph >= MIN_REGION_AREA * 0.8
               for _, _, pw, ph in parts):
            rects[i:i + 1] = parts
    out = []
    for x, y, w, h in rects:
        out.append((x, y, min(w, int(MAX_ASPECT * h)), min(h, int(MAX_ASPECT * w))))
    return out


def corners_in(integral, rect):
    x, y, w, h = rect
    x0, y0 = x // CELL, y // CELL
    x1 = min(integral.shape[1] - 1, (x + w) // CELL)
    y1 = min(integral.shape[0] - 1, (y + h) // CELL)
    return int(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])


def place_regions(args):
    """`k` disjoint regions of one source: the photo is cut into n >= k rectangles
    (split_regions, n growing until enough of them hold MIN_CORNERS FAST corners), and k
    of the textured ones are taken at random, plus `flat` low-texture ones when asked.
    Returns (id, [(rect, is_flat)], saturated: fewer than k were possible)."""
    sid, k, flat, (w, h), grid, whole, seed = args
    if whole:
        return sid, [((0, 0, w, h), False)], True
    integral = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1), np.int64)
    integral[1:, 1:] = grid.cumsum(0).cumsum(1)
    n_max = max(1, w * h // MIN_REGION_AREA)
    best = []
    for n in sorted({min(n_max, int(math.ceil(k * f))) for f in (1, 1.25, 1.6, 2, 3, 5, 8)} | {n_max}):
        rng = rng_for(seed, "split", sid, n)
        rects = split_regions(w, h, n, rng)
        textured = [r for r in rects if corners_in(integral, r) >= MIN_CORNERS]
        flats = [r for r in rects if corners_in(integral, r) < MIN_CORNERS]
        n_flat = min(flat, len(flats))
        take = min(k - n_flat, len(textured))
        picked = [(textured[i], False) for i in sorted(rng.choice(len(textured), take, replace=False))] \
            + [(flats[i], True) for i in sorted(rng.choice(len(flats), n_flat, replace=False))]
        if len(picked) >= k:
            return sid, picked, False
        if len(picked) > len(best):
            best = picked
    return sid, best, True


def allocate(weights, total, caps, start=None):
    """D'Hondt: `total` seats over ids by weight, each at most caps[id], on top of `start`."""
    k = dict(start or {i: 0 for i in weights})
    heap = [(-wt / (k[i] + 1), i) for i, wt in sorted(weights.items()) if k[i] < caps[i]]
    heapq.heapify(heap)
    left = total - sum(k.values())
    while left > 0 and heap:
        _, i = heapq.heappop(heap)
        k[i] += 1
        left -= 1
        if k[i] < caps[i]:
            heapq.heappush(heap, (-weights[i] / (k[i] + 1), i))
    return k


def plan_catalogue(srcs, n_images, seed, pool):
    """The whole catalogue as a list of jobs (one per image), plus the held-out source ids
    and held-out regions (for distractor queries)."""
    rng = rng_for(seed, "plan")
    order = sorted(srcs, key=lambda s: s.id)
    # held out whole: small photos (each would give the catalogue a region or two only)
    photos = [s for s in order if s.kind == "photo" and 100_000 <= s.width * s.height <= 400_000]
    held_out = sorted(rng.choice([s.id for s in photos], min(HELD_OUT_SOURCES, len(photos) // 2),
                                 replace=False).tolist())
    cat_srcs = [s for s in order if s.id not in held_out]
    n_regions = n_images + HELD_OUT_REGIONS
    if n_regions < 3 * len(cat_srcs):  # small sets: a random third as many sources
        keep = set(rng.choice([s.id for s in cat_srcs], max(1, n_regions // 3), replace=False).tolist())
        cat_srcs = [s for s in cat_srcs if s.id in keep]
    by_id = {s.id: s for s in cat_srcs}
    maps = {sid: (wh, grid) for sid, wh, grid in pool.map(corner_map, sorted(by_id), chunksize=2)}
    n_graphic = sum(1 for s in cat_srcs if s.kind == "graphic")
    graphic_cap = max(1, round(HARD_SHARES["gradient"] * n_images / max(1, n_graphic)))
    caps, weights, whole = {}, {}, {}
    for sid, s in by_id.items():
        (w, h), _ = maps[sid]
        whole[sid] = s.kind == "product" or w * h < 2 * MIN_REGION_AREA
        caps[sid] = 1 if whole[sid] else graphic_cap if s.kind == "graphic" else \
            MAX_REGIONS_PER_KIND.get(s.kind, w * h // MIN_REGION_AREA)
        weights[sid] = float(w * h) ** AREA_EXPONENT
    # natural low-texture regions (sky, bokeh, plain walls): one each on randomly chosen photos
    n_flat = int(round(HARD_SHARES["low_texture"] * n_images))
    hosts = [sid for sid in sorted(by_id) if by_id[sid].kind == "photo" and not whole[sid]]
    flat_hosts = set(rng.choice(hosts, min(n_flat, len(hosts)), replace=False).tolist())
    k = allocate(weights, n_regions, caps, {sid: 1 for sid in by_id})
    placed = {}
    for _round in range(30):
        todo = [sid for sid in sorted(by_id) if sid not in placed or len(placed[sid][0]) < k[sid]]
        work = [(sid, k[sid], int(sid in flat_hosts), *maps[sid], whole[sid], seed) for sid in todo]
        for sid, regions, saturated in pool.imap(place_regions, work, chunksize=2):
            placed[sid] = (regions, saturated)
            if saturated or len(regions) < k[sid]:
                caps[sid] = len(regions)
                k[sid] = len(regions)
        short = n_regions - sum(len(r) for r, _ in placed.values())
        if os.environ.get("PHOTOS_DEBUG"):
            print(f"round {_round}: {len(todo)} sources placed again, {short} regions short, "
                  f"{sum(1 for r, sat in placed.values() if not sat)} not saturated", file=sys.stderr)
        if short <= 0:
            break
        k = allocate(weights, n_regions, caps, k)
    regions = [(sid, j, rect, flat) for sid in sorted(placed) for j, (rect, flat) in enumerate(placed[sid][0])]
    # regions kept out of the catalogue, for distractor queries: one from photos with several
    multi = sorted({sid for sid, j, _, flat in regions if j >= 1 and by_id[sid].kind == "photo"})
    reserved = set(rng.choice(multi, min(HELD_OUT_REGIONS, len(multi)), replace=False).tolist())
    held_regions = [(sid, j, rect) for sid, j, rect, flat in regions
                    if sid in reserved and j == 1 and not flat]
    held_keys = {(sid, j) for sid, j, _ in held_regions}
    regions = [r for r in regions if (r[0], r[1]) not in held_keys]
    if len(regions) > n_images:  # trim evenly
        drop = set(rng.choice(len(regions), len(regions) - n_images, replace=False).tolist())
        regions = [r for i, r in enumerate(regions) if i not in drop]
    if len(regions) < n_images:
        print(f"warning: the sources hold only {len(regions)} usable regions", file=sys.stderr)
    names = rng.permutation(len(regions))  # shuffled, so neighbours are not from one photo
    jobs = []
    for (sid, j, rect, flat), nm in zip(regions, names):
        kind = by_id[sid].kind
        job = {"name": f"c{nm + 1:05d}", "source": sid, "region_index": j, "region": rect,
               "source_kind": kind}
        if flat:
            job["hard"] = "low_texture"
        elif kind == "product":
            job["hard"] = "product_on_plain"
        elif kind == "graphic":
            job["hard"] = "gradient"
        jobs.append(job)
    # derived hard cases, on ordinary photo regions
    free = [i for i, jb in enumerate(jobs) if jb["source_kind"] == "photo" and "hard" not in jb]
    picks = rng.permutation(free)
    at = 0
    for hard in DERIVED_HARD:
        n = int(round(HARD_SHARES[hard] * len(jobs)))
        for i in picks[at:at + n]:
            jobs[i]["hard"] = hard
        at += n
    return jobs, held_out, held_regions


# --------------------------------------------------------------------------- image ops

def to_gray3(rgb):
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[..., None], 3, axis=2)


def apply_gamma(rgb, gamma):
    lut = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)
    return cv2.LUT(rgb, lut)


def shift_hue(rgb, degrees, saturation=1.0):
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + degrees * 256.0 / 360.0) % 256.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)


def white_balance(rgb, gains):
    return np.clip(rgb.astype(np.float32) * np.float32(gains), 0, 255).astype(np.uint8)


def resize_to_long(img, long_side):
    h, w = img.shape[:2]
    f = long_side / max(h, w)
    size = (max(1, int(round(w * f))), max(1, int(round(h * f))))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, size, interpolation=interp)


def linear_range(rgb, lo, hi):
    """Map intensities linearly into lo..hi."""
    return np.round(lo + rgb.astype(np.float32) * (hi - lo) / 255.0).astype(np.uint8)


def encode(rgb, fmt, quality, grey=False):
    """Bytes of the image in `fmt` (jpg | png | webp)."""
    im = Image.fromarray(rgb[..., 0] if grey else rgb)
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, "JPEG", quality=int(quality), optimize=True)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=int(quality), method=4)
    else:
        im.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def texture_score(rgb):
    """Mean gradient magnitude of the grey image at <= 512 px (0 = flat)."""
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    f = min(1.0, 512 / max(g.shape))
    if f < 1:
        g = cv2.resize(g, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1)
    return float(np.mean(np.sqrt(gx * gx + gy * gy)))


def on_plain_background(rgb, alpha, rng):
    """A cut-out (or a photo shot on white) centred on a plain light background with a margin."""
    colour = [255, 255, 255] if rng.random() < 0.6 else rng.integers(215, 256, 3).tolist()
    h, w = rgb.shape[:2]
    m = int(round(max(h, w) * rng.uniform(0.05, 0.25)))
    canvas = np.empty((h + 2 * m, w + 2 * m, 3), np.uint8)
    canvas[:] = np.uint8(colour)
    if alpha is not None:
        a = (alpha.astype(np.float32) / 255.0)[..., None]
        rgb = (rgb * a + canvas[m:m + h, m:m + w] * (1 - a)).astype(np.uint8)
    canvas[m:m + h, m:m + w] = rgb
    return canvas, colour, m


# --------------------------------------------------------------------------- catalogue

def derive_catalogue_image(src_rgb, src_alpha, job, seed, source_size):
    """(encoded bytes, ext, derivation steps, final RGB, grey) of one catalogue image."""
    rng = rng_for(seed, "derive", job["source"], job["region_index"])
    x, y, w, h = job["region"]
    img = src_rgb[y:y + h, x:x + w]
    alpha = src_alpha[y:y + h, x:x + w] if src_alpha is not None else None
    wh = f"{src_rgb.shape[1]}x{src_rgb.shape[0]}"
    native = f"{source_size[0]}x{source_size[1]}"
    steps = [f"region x={x} y={y} w={w} h={h} of the source" + (
        f" scaled to {wh} (from {native})" if wh != native else f" ({wh})")]
    if job.get("hard") == "low_texture":
        steps.append(f"hard: low texture (as found: fewer than {MIN_CORNERS} FAST corners)")
    grey_src = bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))
    hard = job.get("hard")
    if alpha is not None and job["source_kind"] in ("astro", "graphic"):
        img = (img * (alpha.astype(np.float32) / 255.0)[..., None]).astype(np.uint8)
        steps.append("transparent parts made black")
    elif hard == "product_on_plain" or alpha is not None:
        img, colour, m = on_plain_background(img, alpha, rng)
        steps.append(f"on plain background rgb{tuple(colour)} with {m} px margin")
    if rng.random() < 0.25:
        img = img[:, ::-1]
        steps.append("mirrored left-right")
    grey = grey_src
    r = rng.random()
    if hard in ("dark", "foggy", "gradient"):
        pass  # keep the colours; the hard derivation below sets the tone
    elif r < 0.06:
        img = to_gray3(img)
        grey = True
        steps.append("greyscale")
    elif r < 0.14:
        d = float(rng.uniform(12, 45) * rng.choice([-1, 1]))
        s = float(rng.uniform(0.7, 1.3))
        img = shift_hue(img, d, s)
        steps.append(f"hue {d:+.0f} deg, saturation x{s:.2f}")
    elif r < 0.22:
        s = float(rng.uniform(0.4, 1.5))
        img = shift_hue(img, 0.0, s)
        steps.append(f"saturation x{s:.2f}")
    elif r < 0.32:
        g = float(rng.uniform(0.65, 1.5))
        img = apply_gamma(img, g)
        steps.append(f"gamma {g:.2f}")
    elif r < 0.38:
        gains = rng.uniform(0.85, 1.15, 3).round(3).tolist()
        img = white_balance(img, gains)
        steps.append(f"white balance gains {gains}")
    img = np.ascontiguousarray(img)
    # size
    long_in = max(img.shape[:2])
    r = rng.random()
    if hard == "tiny":
        target = int(rng.integers(100, 201))
    elif long_in < MIN_LONG_SIDE:              # small: upscaled, as catalogues do
        target = int(rng.integers(MIN_LONG_SIDE, max(MIN_LONG_SIDE, int(min(MAX_UPSCALE * long_in, 640))) + 1))
    elif r < 0.5:
        target = min(long_in, MAX_LONG_SIDE)
    elif r < 0.85:                              # downscaled
        lo = max(MIN_LONG_SIDE, 0.5 * long_in)
        target = int(round(math.exp(rng.uniform(math.log(lo), math.log(max(lo, min(long_in, MAX_LONG_SIDE)))))))
    else:                                       # upscaled x1.1-1.6
        target = min(MAX_LONG_SIDE, int(round(long_in * rng.uniform(1.1, 1.6))))
    if target != long_in:
        img = resize_to_long(img, target)
        steps.append(f"resized {long_in} -> {target} px long side"
                     + (" (upscaled)" if target > long_in else ""))
    # hard cases
    if hard == "blurred":
        s = float(rng.uniform(3.0, 7.0)) * max(img.shape[:2]) / 1000
        s = max(s, 2.5)
        img = cv2.GaussianBlur(img, (0, 0), s)
        steps.append(f"hard: gaussian blur sigma {s:.1f}")
    elif hard == "dark":
        top = int(rng.integers(18, 41))
        img = linear_range(apply_gamma(img, 1.3), 0, top)
        steps.append(f"hard: dark (gamma 1.3, intensities into 0-{top})")
    elif hard == "foggy":
        lo = int(rng.integers(120, 190))
        span = int(rng.integers(18, 36))
        img = linear_range(img, lo, lo + span)
        steps.append(f"hard: foggy (intensities into {lo}-{lo + span})")
    elif hard == "tiny":
        steps.append("hard: tiny")
    # encoding
    r = rng.random()
    if hard in ("gradient", "foggy", "dark") and r < 0.5:
        fmt, q = "png", None
    elif r < 0.07:
        fmt, q = "png", None
    elif r < 0.15:
        fmt, q = "webp", int(rng.integers(75, 93))
    else:
        fmt = "jpg"
        q = int(rng.integers(60, 75)) if rng.random() < 0.05 else int(rng.integers(75, 96))
    steps.append(f"{fmt.upper()}" + (f" q{q}" if q else ""))
    return encode(img, fmt, q, grey), fmt, steps, img, grey


def render_source(args):
    """Write every catalogue image cut from one source; returns their manifest rows."""
    sid, jobs, out_dir, seed = args
    src = _SOURCES[sid]
    rgb, alpha = working_image(src)
    rows = []
    for job in jobs:
        data, fmt, steps, img, grey = derive_catalogue_image(rgb, alpha, job, seed, (src.width, src.height))
        path = Path(out_dir) / "catalogue" / f"{job['name']}.{fmt}"
        path.write_bytes(data)
        rows.append({
            "path": f"catalogue/{path.name}", "source": sid, "package": src.package,
            "version": src.version, "source_file": src.file, "licence": src.licence,
            "credit": src.credit, "kind": src.kind, "region": list(job["region"]),
            "derivation": steps, "hard": job.get("hard"), "width": img.shape[1],
            "height": img.shape[0], "format": fmt, "grey": grey, "bytes": len(data),
            "texture": round(texture_score(img), 2),
        })
    return rows


# --------------------------------------------------------------------------- queries

def rotate_bound(img, degrees, fill):
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    c, s = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(h * s + w * c), int(h * c + w * s)
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(img, m, (nw, nh), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def crop_area(img, keep, rng):
    """A crop keeping `keep` of the area, random aspect (within 0.75..1.33 of the image's)
    and position."""
    h, w = img.shape[:2]
    ar = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    cw = min(w, max(8, int(round(w * math.sqrt(keep * ar)))))
    ch = min(h, max(8, int(round(h * keep * w / cw))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    return img[y:y + ch, x:x + cw], (x, y, cw, ch)


def perspective_warp(img, strength, rng):
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    d = rng.uniform(0, strength, (4, 2)) * np.float32([w, h])
    sign = np.float32([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    dst = (src + d * sign).astype(np.float32)
    m = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def photometric(img, rng):
    b = float(rng.uniform(20, 50) * rng.choice([-1, 1]))
    c = float(rng.uniform(0.6, 1.4))
    g = float(rng.uniform(0.6, 1.6))
    out = np.clip((img.astype(np.float32) - 128) * c + 128 + b, 0, 255).astype(np.uint8)
    return apply_gamma(out, g), f"brightness {b:+.0f}, contrast x{c:.2f}, gamma {g:.2f}"


def framed(img, background, rng):
    """The image scaled to 50-80 % and pasted at a random place on a background of the
    original size: uniform noise, or a held-out photo (shares no pixel with the catalogue)."""
    h, w = img.shape[:2]
    f = float(rng.uniform(0.5, 0.8))
    inner = cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
    if background is None:
        canvas = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        what = "uniform noise"
    else:
        canvas = cv2.resize(background, (w, h), interpolation=cv2.INTER_AREA)
        what = "a held-out photo"
    y = int(rng.integers(0, h - inner.shape[0] + 1))
    x = int(rng.integers(0, w - inner.shape[1] + 1))
    canvas[y:y + inner.shape[0], x:x + inner.shape[1]] = inner
    return canvas, f"scaled x{f:.2f} onto {what} at ({x},{y})"


def attack_image(img, attack, rng, background):
    """(attacked RGB, JPEG quality to save with, parameter text)."""
    q = int(rng.integers(85, 93))
    fill = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
    if attack == "crop":
        keep = float(rng.uniform(0.4, 0.7))
        out, r = crop_area(img, keep, rng)
        return out, q, f"keep {keep:.2f} of the area at {r}"
    if attack == "crop_heavy":
        keep = float(rng.uniform(0.2, 0.4))
        out, r = crop_area(img, keep, rng)
        return out, q, f"keep {keep:.2f} of the area at {r}"
    if attack == "rotate_small":
        a = float(rng.uniform(3, 20) * rng.choice([-1, 1]))
        return rotate_bound(img, a, fill), q, f"rotate {a:+.1f} deg, fill {fill}"
    if attack == "rotate_right":
        k = int(rng.integers(1, 4))
        return np.ascontiguousarray(np.rot90(img, k)), q, f"rotate {90 * k} deg"
    if attack == "scale_down":
        f = float(rng.uniform(0.25, 0.35))
        return cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA), q, f"scale x{f:.2f}"
    if attack == "jpeg_heavy":
        jq = int(rng.integers(10, 21))
        return img, jq, f"JPEG q{jq}"
    if attack == "perspective":
        s = float(rng.uniform(0.05, 0.18))
        return perspective_warp(img, s, rng), q, f"corners moved up to {s:.2f} of the size"
    if attack == "framed":
        out, txt = framed(img, background if rng.random() < 0.5 else None, rng)
        return out, q, txt
    if attack == "gray_blur":
        s = float(rng.uniform(1.0, 2.5))
        return cv2.GaussianBlur(to_gray3(img), (0, 0), s), q, f"grey, gaussian blur sigma {s:.1f}"
    if attack == "mirror_crop":
        keep = float(rng.uniform(0.5, 0.8))
        out, r = crop_area(img[:, ::-1], keep, rng)
        return np.ascontiguousarray(out), q, f"mirrored, keep {keep:.2f} of the area"
    if attack == "photometric":
        out, txt = photometric(img, rng)
        return out, q, txt
    if attack == "recolour":
        d = float(rng.uniform(20, 90) * rng.choice([-1, 1]))
        s = float(rng.uniform(0.3, 1.6))
        return shift_hue(img, d, s), q, f"hue {d:+.0f} deg, saturation x{s:.2f}"
    if attack == "crop_rotate_jpeg":
        keep = float(rng.uniform(0.5, 0.7))
        a = float(rng.uniform(5, 15) * rng.choice([-1, 1]))
        jq = int(rng.integers(25, 46))
        out, _ = crop_area(img, keep, rng)
        return rotate_bound(out, a, fill), jq, f"keep {keep:.2f}, rotate {a:+.1f} deg, JPEG q{jq}"
    if attack == "scale_blur_jpeg":
        f = float(rng.uniform(0.4, 0.6))
        s = float(rng.uniform(0.8, 1.5))
        jq = int(rng.integers(30, 51))
        out = cv2.GaussianBlur(cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA), (0, 0), s)
        return out, jq, f"scale x{f:.2f}, blur sigma {s:.1f}, JPEG q{jq}"
    if attack == "mirror_photometric_jpeg":
        out, txt = photometric(np.ascontiguousarray(img[:, ::-1]), rng)
        jq = int(rng.integers(35, 61))
        return out, jq, f"mirrored, {txt}, JPEG q{jq}"
    if attack == "perspective_crop_jpeg":
        keep = float(rng.uniform(0.55, 0.8))
        s = float(rng.uniform(0.05, 0.12))
        jq = int(rng.integers(30, 56))
        out, _ = crop_area(img, keep, rng)
        return perspective_warp(out, s, rng), jq, f"keep {keep:.2f}, corners up to {s:.2f}, JPEG q{jq}"
    if attack == "rotate_right_scale_jpeg":
        k = int(rng.integers(1, 4))
        f = float(rng.uniform(0.35, 0.6))
        jq = int(rng.integers(30, 56))
        out = cv2.resize(np.ascontiguousarray(np.rot90(img, k)), None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        return out, jq, f"rotate {90 * k} deg, scale x{f:.2f}, JPEG q{jq}"
    raise ValueError(attack)


def read_rgb(path):
    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def render_query(args):
    """Write one attacked query; returns its truth row."""
    job, out_dir, seed = args
    rng = rng_for(seed, "query", job["query"])
    img = read_rgb(Path(out_dir) / job["target"])
    background = None
    if job.get("background"):
        background, _ = working_image(_SOURCES[job["background"]])
    out, q, params = attack_image(img, job["attack"], rng, background)
    data = encode(np.ascontiguousarray(out), "jpg", q)
    (Path(out_dir) / "queries" / job["query"]).write_bytes(data)
    return {"query": f"queries/{job['query']}", "expected": job["target"], "attack": job["attack"],
            "params": params + (f"; background {job['background']}" if "held-out photo" in params else ""),
            "width": out.shape[1], "height": out.shape[0]}


def render_distractor(args):
    """Write one distractor query (a held-out photo or region); returns its truth row."""
    job, out_dir, seed = args
    rng = rng_for(seed, "distractor", job["query"])
    rgb, _ = working_image(_SOURCES[job["source"]])
    if job.get("region"):
        x, y, w, h = job["region"]
        img = rgb[y:y + h, x:x + w]
        what = f"held-out region x={x} y={y} w={w} h={h} of {job['source']} (catalogue images come from other regions of this photo)"
    else:
        keep = float(rng.uniform(0.3, 1.0))
        img, r = crop_area(rgb, keep, rng)
        what = f"held-out photo {job['source']}, crop {r}"
    target = int(rng.integers(400, 1201))
    img = resize_to_long(np.ascontiguousarray(img), min(target, max(img.shape[:2])))
    if rng.random() < 0.3:
        img, txt = photometric(img, rng)
        what += f", {txt}"
    q = int(rng.integers(70, 93))
    data = encode(np.ascontiguousarray(img), "jpg", q)
    (Path(out_dir) / "queries" / job["query"]).write_bytes(data)
    return {"query": f"queries/{job['query']}", "expected": None, "attack": "distractor",
            "params": what + f", JPEG q{q}", "source": job["source"],
            "width": img.shape[1], "height": img.shape[0]}


def plan_queries(rows, n_labelled, n_distractors, held_out, held_regions, seed):
    rng = rng_for(seed, "queries")
    by_name = sorted(rows, key=lambda r: r["path"])
    picks = rng.choice(len(by_name), min(n_labelled, len(by_name)), replace=False)
    attacks = [ATTACKS[i % len(ATTACKS)] for i in range(len(picks))]
    attacks = [attacks[i] for i in rng.permutation(len(attacks))]
    jobs = []
    for i, attack in zip(picks, attacks):
        r = by_name[int(i)]
        small = min(r["width"], r["height"]) < 240
        if small and attack in NEEDS_BIG:  # a 0.3x copy of a thumbnail is no query
            attack = ATTACKS[int(rng.integers(0, len(ATTACKS)))]
            while attack in NEEDS_BIG:
                attack = ATTACKS[int(rng.integers(0, len(ATTACKS)))]
        stem = Path(r["path"]).stem
        job = {"query": f"{stem}__{attack}.jpg", "target": r["path"], "attack": attack}
        if attack == "framed":
            job["background"] = held_out[int(rng.integers(0, len(held_out)))]
        jobs.append(job)
    dist = []
    n_regions = min(len(held_regions), n_distractors // 2)
    for k, (sid, j, rect) in enumerate(held_regions[:n_regions]):
        dist.append({"query": f"distractor__{k:03d}.jpg", "source": sid, "region": list(rect)})
    for k in range(n_regions, n_distractors):
        dist.append({"query": f"distractor__{k:03d}.jpg", "source": held_out[k % len(held_out)]})
    return jobs, dist


# --------------------------------------------------------------------------- stats

def orb_count(path):
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        return -1
    return len(cv2.ORB_create(1000).detect(gray, None))


def percentiles(values, ps=(0, 5, 25, 50, 75, 95, 100)):
    if not values:
        return {}
    a = np.asarray(values, float)
    return {f"p{p}": round(float(np.percentile(a, p)), 1) for p in ps}


def summarise(out, rows, truth, sources_doc, orb, timings):
    longs = [max(r["width"], r["height"]) for r in rows]
    shorts = [min(r["width"], r["height"]) for r in rows]
    bins = [0, 200, 320, 500, 800, 1200, 1600, 2001]
    hist = Counter()
    for v in longs:
        for lo, hi in zip(bins, bins[1:]):
            if lo <= v < hi:
                hist[f"{lo}-{hi - 1}"] += 1
    stats = {
        "catalogue_images": len(rows),
        "catalogue_bytes": sum(r["bytes"] for r in rows),
        "queries": len(truth),
        "labelled_queries": sum(1 for t in truth if t["expected"]),
        "distractor_queries": sum(1 for t in truth if not t["expected"]),
        "query_bytes": sum((out / t["query"]).stat().st_size for t in truth),
        "sources_used": len({r["source"] for r in rows}),
        "per_package": dict(sorted(Counter(r["package"] for r in rows).items())),
        "sources_per_package": dict(sorted(Counter(
            s["package"] for s in sources_doc if s["images"] > 0).items())),
        "per_kind": dict(sorted(Counter(r["kind"] for r in rows).items())),
        "per_licence": dict(Counter(r["licence"] for r in rows).most_common()),
        "hard": dict(sorted(Counter(r["hard"] or "none" for r in rows).items())),
        "formats": dict(sorted(Counter(r["format"] for r in rows).items())),
        "greyscale": sum(1 for r in rows if r["grey"]),
        "mirrored": sum(1 for r in rows if any("mirrored" in s for s in r["derivation"])),
        "upscaled": sum(1 for r in rows if any("upscaled" in s for s in r["derivation"])),
        "long_side_histogram": dict(hist),
        "long_side": percentiles(longs),
        "short_side": percentiles(shorts),
        "file_kib": percentiles([r["bytes"] / 1024 for r in rows]),
        "texture": percentiles([r["texture"] for r in rows]),
        "per_attack": dict(sorted(Counter(t["attack"] for t in truth).items())),
        "timings_s": timings,
    }
    if orb is not None:
        counts = [orb[r["path"]] for r in rows]
        stats["orb1000_keypoints"] = percentiles(counts)
        stats["orb1000_under_50"] = sum(1 for c in counts if c < 50)
        stats["orb1000_zero"] = sum(1 for c in counts if c == 0)
        stats["orb1000_under_50_by_hard"] = dict(sorted(Counter(
            (r["hard"] or "none") for r in rows if orb[r["path"]] < 50).items()))
    return stats


# --------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output directory (not inside the repository)")
    ap.add_argument("--sources", type=Path, default=photo_sources.DEFAULT_ROOT,
                    help="where install_photo_sources.sh unpacked the packages")
    ap.add_argument("--small", action="store_true", help="500 images, 100 queries (90 + 10 distractors)")
    ap.add_argument("--images", type=int, help="catalogue images (default 5000; --small 500)")
    ap.add_argument("--queries", type=int, help="labelled queries (default 450; --small 90)")
    ap.add_argument("--distractors", type=int, help="distractor queries (default 50; --small 10)")
    ap.add_argument("--seed", type=int, default=20240613)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--audit-file", type=Path, default=DEFAULT_AUDIT,
                    help="source overlap audit to reuse (default: the checked-in one)")
    ap.add_argument("--run-audit", action="store_true",
                    help="compare every pair of sources again (writes OUT/photo_source_overlaps.json)")
    ap.add_argument("--no-orb-stats", action="store_true", help="skip counting ORB keypoints")
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    args = ap.parse_args()
    n_images = args.images or (500 if args.small else 5000)
    n_queries = args.queries or (90 if args.small else 450)
    n_distractors = args.distractors if args.distractors is not None else (10 if args.small else 50)

    out = args.out.resolve()
    repo = Path(__file__).resolve().parent.parent
    if out == repo or repo in out.parents:
        sys.exit(f"refusing to write into the repository ({out}); the data set is not committed")
    for sub in ("catalogue", "queries"):
        d = out / sub
        if d.exists() and any(d.iterdir()):
            if not args.force:
                sys.exit(f"{d} is not empty (use --force to replace it)")
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)

    timings = {}
    t0 = time.perf_counter()
    srcs = photo_sources.discover(args.sources)
    versions = photo_sources.installed_versions(args.sources)
    for pkg, want in photo_sources.DEBIAN_PACKAGES.items():
        if versions.get(pkg) != want:
            print(f"warning: {pkg} is {versions.get(pkg)}, the published set used {want}", file=sys.stderr)
    with Pool(args.workers, initializer=init_worker, initargs=(args.sources,)) as pool:
        t = time.perf_counter()
        capped, dropped = cap_astro(srcs)
        overlaps = source_overlaps(capped, pool, args, out)
        kept, dropped_overlap = drop_overlapping(capped, overlaps)
        dropped.update(dropped_overlap)
        timings["source_audit"] = round(time.perf_counter() - t, 1)
        print(f"sources: {len(srcs)} found, {len(dropped)} left out, {len(kept)} kept "
              f"({timings['source_audit']} s audit)", file=sys.stderr)

        t = time.perf_counter()
        jobs, held_out, held_regions = plan_catalogue(kept, n_images, args.seed, pool)
        by_source = defaultdict(list)
        for jb in jobs:
            by_source[jb["source"]].append(jb)
        work = [(sid, js, str(out), args.seed) for sid, js in sorted(by_source.items(),
                key=lambda kv: -len(kv[1]))]
        rows = []
        for part in pool.imap_unordered(render_source, work):
            rows += part
        rows.sort(key=lambda r: r["path"])
        timings["catalogue"] = round(time.perf_counter() - t, 1)
        print(f"catalogue: {len(rows)} images ({timings['catalogue']} s)", file=sys.stderr)

        t = time.perf_counter()
        qjobs, djobs = plan_queries(rows, n_queries, n_distractors, held_out, held_regions, args.seed)
        truth = list(pool.imap(render_query, [(j, str(out), args.seed) for j in qjobs], chunksize=4))
        truth += list(pool.imap(render_distractor, [(j, str(out), args.seed) for j in djobs]))
        truth.sort(key=lambda r: r["query"])
        timings["queries"] = round(time.perf_counter() - t, 1)
        print(f"queries: {len(truth)} ({timings['queries']} s)", file=sys.stderr)

        orb = None
        if not args.no_orb_stats:
            t = time.perf_counter()
            counts = pool.map(orb_count, [out / r["path"] for r in rows], chunksize=16)
            orb = {r["path"]: c for r, c in zip(rows, counts)}
            for r in rows:
                r["orb1000_keypoints"] = orb[r["path"]]
            timings["orb_stats"] = round(time.perf_counter() - t, 1)
    timings["total"] = round(time.perf_counter() - t0, 1)

    used = Counter(r["source"] for r in rows)
    sources_doc = []
    for s in srcs:
        role = ("left out: " + dropped[s.id] if s.id in dropped else
                "held out: distractor queries only" if s.id in held_out else
                "catalogue" if used[s.id] else
                "not used (no region with texture enough, or not drawn for a small set)")
        sources_doc.append({"id": s.id, "package": s.package, "version": s.version, "file": s.file,
                            "kind": s.kind, "licence": s.licence, "credit": s.credit,
                            "width": s.width, "height": s.height, "images": used[s.id], "role": role})
    meta = {"generator": "samples/make_photo_catalogue.py", "generator_version": GENERATOR_VERSION,
            "seed": args.seed, "package_versions": versions,
            "python_packages": {"numpy": np.__version__, "opencv": cv2.__version__,
                                "pillow": Image.__version__}}
    (out / "manifest.json").write_text(json.dumps({**meta, "images": rows}, indent=1) + "\n")
    (out / "sources.json").write_text(json.dumps({**meta, "overlaps": [list(o) for o in overlaps],
                                                  "sources": sources_doc}, indent=1) + "\n")
    (out / "truth.json").write_text(json.dumps({**meta, "queries": truth}, indent=1) + "\n")
    with open(out / "truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "expected", "attack", "params"])
        for t in truth:
            w.writerow([t["query"], t["expected"] or "", t["attack"], t["params"]])
    stats = summarise(out, rows, truth, sources_doc, orb, timings)
    (out / "stats.json").write_text(json.dumps({**meta, **stats}, indent=1) + "\n")
    print(json.dumps({k: stats[k] for k in ("catalogue_images", "catalogue_bytes", "queries",
                                            "sources_used", "hard", "timings_s")}), file=sys.stderr)


if __name__ == "__main__":
    main()
