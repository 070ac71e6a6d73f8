#!/usr/bin/env python3
"""Baseline: the old Python image matcher (OpenCV ORB + Annoy), for side-by-side benchmarks.

What it reproduces (see shared/reference/000_*.txt, the old system's memory guide):
  * every catalogue image is read with cv2.imread as grayscale, at its own size
    (the old pipeline did no resizing), and described by cv2.ORB_create(nfeatures=N);
  * all 256-bit ORB descriptors, unpacked to bits (np.unpackbits), go into ONE
    annoy.AnnoyIndex(256, 'hamming') held in RAM, then build(n_trees) -- the step
    that was OOM-killed at ~90M descriptors and led to the 1000->150 features,
    50->15 trees presets;
  * a query image is described the same way; each descriptor asks
    get_nns_by_vector(v, 2, search_k, include_distances=True); a Lowe ratio test
    (d1 < 0.75 * d2) keeps a match when two neighbours come back (a lone neighbour is
    kept as is); each kept match is one vote for the catalogue image that owns the
    neighbour; catalogue images are ranked by votes. No geometric verification.

Why: our Rust indexer must beat this on memory AND quality, on the same data and
with the same presets, so this script measures exactly those numbers.

Queries are named `<catalogue stem>__<attack>.<ext>` (the right answer is the
catalogue image with that stem); `distractor__<name>.<ext>` must match nothing.
False-positive figure (kept simple): the median votes of the correct top-1 answers
over the labelled queries is taken as "a typical true match"; a distractor whose
top-1 has at least that many votes counts as a false positive (if no query was
answered correctly, any vote at all counts).

Unreadable images never crash the run: they are counted as failed (a failed query
is a miss). Latency is per readable query image: read + ORB + all Annoy look-ups.

    python3 annoy_baseline.py --catalogue DIR --queries DIR --nfeatures 150 \
        --n-trees 15 --search-k 50 [--k 5] [--json]
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from annoy import AnnoyIndex

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
RATIO = 0.75


def list_images(directory):
    return sorted(p for p in Path(directory).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def describe(orb, path):
    """ORB descriptors (n, 32) uint8 of a grayscale read, or None if unreadable."""
    try:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            return None
        _, des = orb.detectAndCompute(gray, None)
    except Exception:  # whatever OpenCV or the file system throws: count it, never crash
        return None
    return des if des is not None else np.zeros((0, 32), np.uint8)


def build_index(paths, orb, n_trees):
    t0 = time.perf_counter()
    per_image, failed = [], []
    for p in paths:
        des = describe(orb, p)
        if des is None:
            failed.append(p.name)
            des = np.zeros((0, 32), np.uint8)
        per_image.append(des)
    extract_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = AnnoyIndex(256, "hamming")
    owner = []
    for image_id, des in enumerate(per_image):
        for d in np.unpackbits(des, axis=1):
            index.add_item(len(owner), d.tolist())
            owner.append(image_id)
    index.build(n_trees)
    build_s = time.perf_counter() - t0
    stats = {
        "images": len(paths), "failed": failed,
        "images_without_descriptors": sum(1 for d in per_image if len(d) == 0) - len(failed),
        "descriptors_indexed": len(owner),
        "extract_seconds": round(extract_s, 3), "annoy_build_seconds": round(build_s, 3),
    }
    return index, np.asarray(owner, np.int64), stats


def query(index, owner, n_images, orb, path, search_k, depth):
    """Ranked [(image_id, votes)] (at most `depth`), or None if unreadable."""
    des = describe(orb, path)
    if des is None:
        return None
    votes = np.zeros(n_images, np.int64)
    for d in np.unpackbits(des, axis=1):
        ids, dists = index.get_nns_by_vector(d.tolist(), 2, search_k=search_k,
                                             include_distances=True)
        if len(ids) == 2 and not dists[0] < RATIO * dists[1]:
            continue
        if ids:
            votes[owner[ids[0]]] += 1
    order = sorted(np.nonzero(votes)[0], key=lambda i: (-votes[i], i))[:depth]
    return [(int(i), int(votes[i])) for i in order]


def expected_of(name, stems):
    """(expected stem or None, attack name, is_distractor) from a query file name."""
    stem = Path(name).stem
    if stem.startswith("distractor__"):
        return None, "distractor", True
    owners = [s for s in stems if stem.startswith(s + "__")]
    if owners:
        best = max(owners, key=len)
        return best, stem[len(best) + 2:], False
    head, _, attack = stem.partition("__")
    return head, attack or "unlabelled", False


def run(args):
    orb = cv2.ORB_create(nfeatures=args.nfeatures)
    catalogue = list_images(args.catalogue)
    index, owner, build = build_index(catalogue, orb, args.n_trees)
    stems = [p.stem for p in catalogue]

    with tempfile.TemporaryDirectory() as tmp:  # the old system saved a cache file
        index_path = os.path.join(tmp, "index.ann")
        index.save(index_path)  # annoy then serves queries from the mmapped file
        index_bytes = os.path.getsize(index_path)

        depth = max(args.k, 5)
        results, latencies, failed = [], [], []
        for q in list_images(args.queries):
            expected, attack, distractor = expected_of(q.name, stems)
            t0 = time.perf_counter()
            ranked = query(index, owner, len(catalogue), orb, q, args.search_k, depth)
            ms = (time.perf_counter() - t0) * 1000
            if ranked is None:
                failed.append(q.name)
                ranked = []
            else:
                latencies.append(ms)
            top = [stems[i] for i, _ in ranked]
            results.append({
                "query": q.name, "expected": expected, "attack": attack,
                "distractor": distractor, "latency_ms": round(ms, 2),
                "top": [[stems[i], v] for i, v in ranked[:args.k]],
                "rank": top.index(expected) + 1 if expected in top else None,
                "top1_votes": ranked[0][1] if ranked else 0,
            })
        index.unload()

    labelled = [r for r in results if not r["distractor"]]
    per_attack = defaultdict(list)
    for r in labelled:
        per_attack[r["attack"]].append(r)

    def recall(rs, at):
        return round(sum(1 for r in rs if r["rank"] and r["rank"] <= at) / len(rs), 4) if rs else None

    true_votes = [r["top1_votes"] for r in labelled if r["rank"] == 1]
    threshold = float(np.median(true_votes)) if true_votes else 1.0
    distractors = [r for r in results if r["distractor"]]
    false_pos = [r["query"] for r in distractors if r["top1_votes"] >= max(threshold, 1)]
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "config": {"nfeatures": args.nfeatures, "n_trees": args.n_trees,
                   "search_k": args.search_k, "k": args.k, "ratio": RATIO,
                   "opencv": cv2.__version__, "numpy": np.__version__},
        "catalogue": build,
        "descriptors_indexed": build["descriptors_indexed"],
        "extract_seconds": build["extract_seconds"],
        "annoy_build_seconds": build["annoy_build_seconds"],
        "annoy_index_bytes": index_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "n_queries": len(results), "n_labelled": len(labelled),
        "n_distractors": len(distractors), "failed_queries": failed,
        "recall_at_1": recall(labelled, 1), "recall_at_5": recall(labelled, 5),
        "per_attack": {a: {"n": len(rs), "recall_at_1": recall(rs, 1), "recall_at_5": recall(rs, 5)}
                       for a, rs in sorted(per_attack.items())},
        "distractor_fp_threshold_votes": threshold,
        "distractor_false_positives": len(false_pos), "distractor_fp_files": false_pos,
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 2),
        "queries": results,
    }


def print_table(rep):
    c, b = rep["config"], rep["catalogue"]
    print(f"ORB nfeatures={c['nfeatures']}  annoy n_trees={c['n_trees']}  search_k={c['search_k']}"
          f"  (opencv {c['opencv']})")
    print(f"catalogue images        {b['images']} ({len(b['failed'])} failed,"
          f" {b['images_without_descriptors']} without descriptors)")
    rows = [("descriptors indexed", rep["descriptors_indexed"]),
            ("extract seconds", rep["extract_seconds"]),
            ("annoy build seconds", rep["annoy_build_seconds"]),
            ("annoy index bytes", rep["annoy_index_bytes"]),
            ("peak RSS bytes", rep["peak_rss_bytes"]),
            ("queries", f"{rep['n_queries']} ({rep['n_labelled']} labelled, "
                        f"{rep['n_distractors']} distractors, {len(rep['failed_queries'])} failed)"),
            ("recall@1", rep["recall_at_1"]), ("recall@5", rep["recall_at_5"]),
            ("latency p50 / p95 ms", f"{rep['latency_ms_p50']} / {rep['latency_ms_p95']}"),
            ("distractor FP", f"{rep['distractor_false_positives']}/{rep['n_distractors']}"
                              f" (top-1 votes >= {rep['distractor_fp_threshold_votes']})")]
    for name, value in rows:
        print(f"{name:<24}{value}")
    print(f"\n{'attack':<24}{'n':>4}{'R@1':>8}{'R@5':>8}")
    for attack, s in rep["per_attack"].items():
        print(f"{attack:<24}{s['n']:>4}{s['recall_at_1']:>8}{s['recall_at_5']:>8}")


def main():
    ap = argparse.ArgumentParser(description="ORB + Annoy baseline (the old system).")
    ap.add_argument("--catalogue", required=True, type=Path)
    ap.add_argument("--queries", required=True, type=Path)
    ap.add_argument("--nfeatures", type=int, default=150)
    ap.add_argument("--n-trees", type=int, default=15)
    ap.add_argument("--search-k", type=int, default=50)
    ap.add_argument("--k", type=int, default=5, help="results listed per query")
    ap.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = ap.parse_args()
    for d in (args.catalogue, args.queries):
        if not d.is_dir():
            sys.exit(f"not a directory: {d}")
    rep = run(args)
    if args.json:
        json.dump(rep, sys.stdout, indent=1)
        print()
    else:
        print_table(rep)


if __name__ == "__main__":
    main()
