#!/usr/bin/env python3
"""Build the bundled sample catalogue (and, on request, an un-bundled holdout set).

Every image comes from the sample data that ships inside the scikit-image wheel
(skimage/data/*), so nothing is downloaded. Photos keep their native resolution
(nothing is upscaled); a few are derived on purpose into the hard cases that real
catalogues contain and that default ORB handles badly: a dark low-contrast photo
(moon), a smooth sky crop, a smooth colour gradient, a product shot on plain
white, a very dark photo (0-25 intensity), a foggy photo (narrow grey range),
motion blur, a tiny thumbnail, binary silhouettes, repetitive textures.

Each source photo is used for ONE catalogue entry only (or for disjoint crops),
so a copy of a catalogue image has exactly one right answer.

Usage (deterministic; pinned versions in samples/requirements.txt):
    python3 samples/make_catalogue.py                      # writes samples/catalogue + samples/README.md
    python3 samples/make_catalogue.py --holdout /tmp/holdout   # also writes distractor queries

The holdout images are NOT bundled: they are photos and crops that share no
pixels with any catalogue image, written as `distractor__<name>.<ext>` so they
can be dropped straight into a query directory (they must match nothing).
"""
import argparse
from pathlib import Path

import numpy as np
import skimage
import skimage.data as data
from PIL import Image
from skimage.draw import ellipse, polygon

HERE = Path(__file__).resolve().parent
JPEG_QUALITY = 90
# README.md from this heading on is maintained by hand (the benchmark photo catalogue).
PRESERVED_FROM = "## Benchmark photo catalogue"

# Licence wording as stated by scikit-image (docstrings of skimage.data.*).
PD = "no known copyright restrictions, released into the public domain"
NO_KNOWN = "no known copyright restrictions"
CC0 = "CC0"
NOSTATE = ("none stated per image; shipped in the scikit-image wheel, which is "
           "BSD-3-Clause")


def product_shot_coffee():
    """Cut the cup, saucer and spoon out of coffee() and paste them on white."""
    img = data.coffee()
    h, w = img.shape[:2]
    mask = np.zeros((h, w), bool)
    for rr, cc in (
        ellipse(229, 278, 157, 203, shape=(h, w)),                    # saucer
        ellipse(112, 290, 93, 117, shape=(h, w)),                     # cup rim
        polygon([110, 110, 290, 290], [172, 408, 380, 195], (h, w)),  # cup body
        polygon([75, 65, 70, 110, 130], [395, 410, 425, 420, 395], (h, w)),  # spoon
    ):
        mask[rr, cc] = True
    out = np.full_like(img, 255)
    out[mask] = img[mask]
    rows, cols = np.nonzero(mask)
    pad = 24
    canvas = np.full((rows.max() - rows.min() + 1 + 2 * pad,
                      cols.max() - cols.min() + 1 + 2 * pad, 3), 255, np.uint8)
    canvas[pad:-pad, pad:-pad] = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return canvas


def very_dark(img):
    """Scale intensities linearly into 0..25 (an underexposed night shot)."""
    return np.round(img.astype(np.float64) * 25.0 / 255.0).astype(np.uint8)


def foggy(img, lo=150, hi=180):
    """Compress intensities into the narrow light-grey range lo..hi (fog/haze)."""
    return np.round(lo + img.astype(np.float64) * (hi - lo) / 255.0).astype(np.uint8)


def retina_crop(r0, c0, size_r, size_c):
    return data.retina()[r0:r0 + size_r, c0:c0 + size_c]


# (file name, source, licence, derivation, builder)
CATALOGUE = [
    ("astronaut_eileen_collins.jpg", "skimage.data.astronaut()", PD + " (NASA)", "none", data.astronaut),
    ("chelsea_cat_very_dark.jpg", "skimage.data.chelsea()", "CC0 by the photographer (Stefan van der Walt)",
     "very dark: intensities scaled linearly to 0-25", lambda: very_dark(data.chelsea())),
    ("cameraman_foggy_low_contrast.jpg", "skimage.data.camera()", "CC0 by the photographer (Lav Varshney)",
     "foggy: intensities compressed linearly into the grey range 150-180",
     lambda: foggy(data.camera())),
    ("coffee_cup_product_on_white.jpg", "skimage.data.coffee()", "CC0 by the photographer (Rachel Michetti); courtesy of Pikolo Espresso Bar",
     "product shot: cup, saucer and spoon cut out with a hand-drawn ellipse/polygon mask, pasted on plain white with 24 px margin",
     product_shot_coffee),
    ("rocket_dusk_sky_crop.jpg", "skimage.data.rocket()", "released into the public domain by SpaceX",
     "sky-only crop rows 0-111, cols 96-551 (smooth dusk gradient, no structure)",
     lambda: data.rocket()[0:112, 96:552]),
    ("rocket_launch_pad.jpg", "skimage.data.rocket()", "released into the public domain by SpaceX",
     "crop rows 120-426 (all columns); disjoint from the sky crop",
     lambda: data.rocket()[120:]),
    ("greek_coins.jpg", "skimage.data.coins()", NO_KNOWN + " (Brooklyn Museum collection)", "none", data.coins),
    ("moon_surface_low_contrast.jpg", "skimage.data.moon()", NOSTATE, "none (naturally dark, low contrast)", data.moon),
    ("scanned_page_text.png", "skimage.data.page()", NOSTATE, "none", data.page),
    ("corner_text_sign.png", "skimage.data.text()", PD + " (Wikipedia, File:Corner.png)", "none", data.text),
    ("brick_wall_texture.jpg", "skimage.data.brick()", "CC0 (CC0Textures, Bricks25)", "none (repetitive texture)", data.brick),
    ("grass_texture.jpg", "skimage.data.grass()", "CC0 (DeviantArt, linolafett Grass-01)", "none (repetitive texture)", data.grass),
    ("gravel_texture.jpg", "skimage.data.gravel()", "CC0 (CC0Textures, Gravel04)", "none (repetitive texture)", data.gravel),
    ("horse_silhouette_binary.png", "skimage.data.horse()", "CC0 given by the owner (Andreas Preuss, openclipart)",
     "bool -> uint8 (black horse on white); PNG to keep it binary",
     lambda: np.where(data.horse(), 255, 0).astype(np.uint8)),
    ("hubble_deep_field_top.jpg", "skimage.data.hubble_deep_field()", "captured by NASA, may be freely used in the public domain",
     "crop rows 0-435 (top half; the bottom half is a holdout distractor)",
     lambda: data.hubble_deep_field()[:436]),
    ("immunohistochemistry_stain.jpg", "skimage.data.immunohistochemistry()", NO_KNOWN + " (CMMI)", "none",
     data.immunohistochemistry),
    ("scikit_image_logo.png", "skimage.data.logo()", NOSTATE,
     "RGBA -> RGB (alpha is fully opaque); PNG for flat colours", lambda: data.logo()[..., :3]),
    ("cell_phase_image.jpg", "skimage.data.cell()", CC0 + ", dedicated to the public domain", "none (smooth, banded background)", data.cell),
    ("retina_microaneurysms_tiny.png", "skimage.data.microaneurysms()", "CC0 given by the owner (Andreas Maier)",
     "none (102x102 thumbnail-sized image)", data.microaneurysms),
    ("retina_optic_disc_crop.jpg", "skimage.data.retina()", "CC0 1.0 Universal (Wikimedia Commons; Mikael Haggstrom)",
     "crop rows 384-895, cols 0-511", lambda: retina_crop(384, 0, 512, 512)),
    ("retina_macula_crop.jpg", "skimage.data.retina()", "CC0 1.0 Universal (Wikimedia Commons; Mikael Haggstrom)",
     "crop rows 444-955, cols 560-1071 (smooth, low texture); disjoint from the optic-disc crop",
     lambda: retina_crop(444, 560, 512, 512)),
    ("clock_motion_blur.jpg", "skimage.data.clock()", "released into the public domain by the photographer (Stefan van der Walt)",
     "none (motion-blurred photo)", data.clock),
    ("checkerboard_pattern.png", "skimage.data.checkerboard()", NOSTATE + " (synthetic)",
     "none (every corner looks alike)", data.checkerboard),
    ("colorwheel_smooth_gradient.png", "skimage.data.colorwheel()", NOSTATE + " (synthetic)",
     "none (smooth hue gradient)", data.colorwheel),
    ("shepp_logan_phantom.png", "skimage.data.shepp_logan_phantom()", NOSTATE + " (synthetic)",
     "float 0..1 -> uint8 (flat ellipses, few corners)",
     lambda: np.round(data.shepp_logan_phantom() * 255).astype(np.uint8)),
]

# Distractor queries for acceptance checks: NOT bundled, share no pixels with the
# catalogue (other photos, or crops disjoint from the catalogue crops).
HOLDOUT = [
    ("hubble_deep_field_bottom.jpg", "skimage.data.hubble_deep_field()", "rows 436-871, disjoint from the catalogue's top half",
     lambda: data.hubble_deep_field()[436:]),
    ("retina_lower_crop.jpg", "skimage.data.retina()", "rows 980-1299, cols 450-959, disjoint from both catalogue crops",
     lambda: retina_crop(980, 450, 320, 510)),
    ("coffee_wood_table_strip.jpg", "skimage.data.coffee()", "cols 490-599: wood only, outside the product-shot mask",
     lambda: data.coffee()[:, 490:]),
    ("motorcycle_left.jpg", "skimage.data.stereo_motorcycle()[0]", "Middlebury 2014 stereo; no licence stated by scikit-image",
     lambda: data.stereo_motorcycle()[0]),
    ("motorcycle_right.jpg", "skimage.data.stereo_motorcycle()[1]", "other view of the same scene",
     lambda: data.stereo_motorcycle()[1]),
    ("lfw_faces_montage.jpg", "skimage.data.lfw_subset()", "200 faces of 25x25 tiled 10x20",
     lambda: (data.lfw_subset().reshape(10, 20, 25, 25).transpose(0, 2, 1, 3)
              .reshape(250, 500) * 255).round().astype(np.uint8)),
    ("binary_blobs.png", "skimage.data.binary_blobs(length=512, rng=7)", "synthetic",
     lambda: (data.binary_blobs(length=512, rng=7) * 255).astype(np.uint8)),
    ("blank_white.png", "numpy", "synthetic 512x512 plain white: yields no ORB keypoints at all",
     lambda: np.full((512, 512), 255, np.uint8)),
]


def save(arr, path):
    img = Image.fromarray(np.ascontiguousarray(arr))
    if path.suffix == ".jpg":
        img.save(path, quality=JPEG_QUALITY)
    else:
        img.save(path)


def write_readme(out_dir, readme):
    total = sum((out_dir / name).stat().st_size for name, *_ in CATALOGUE)
    lines = [
        "# Sample catalogue",
        "",
        "`catalogue/` is a small bundled catalogue for tests, demos and benchmarks. Every",
        "image comes from the sample data shipped inside the scikit-image wheel",
        f"(scikit-image {skimage.__version__}); nothing is downloaded. Photos keep their native",
        "resolution. Several entries are deliberately hard for ORB (low texture, dark, foggy,",
        "product shot on white, smooth gradients, tiny, binary, repetitive textures): real",
        "catalogues contain such images and the indexer must still find their copies.",
        "Each source photo feeds one entry only (or disjoint crops), so every copy of a",
        "catalogue image has exactly one right answer.",
        "",
        "Regenerate (deterministic with the versions in `requirements.txt`):",
        "",
        "    pip install -r samples/requirements.txt",
        "    python3 samples/make_catalogue.py",
        "",
        "Holdout distractors (NOT bundled; photos and crops sharing no pixels with the",
        "catalogue, named `distractor__<name>` so they drop into a query directory and must",
        "match nothing):",
        "",
        "    python3 samples/make_catalogue.py --skip-catalogue --holdout /tmp/holdout",
        "",
        "The old system's baseline runs on it: `indexer/bench/annoy_baseline.py`.",
        "",
        "Licences below are quoted from the `skimage.data` docstrings of scikit-image;",
        "where scikit-image states none for an image, that is said (the package itself",
        "is BSD-3-Clause).",
        "",
        f"## Files ({len(CATALOGUE)} images, {total / 1e6:.2f} MB)",
        "",
    ]
    for name, source, licence, derivation, _ in CATALOGUE:
        lines.append(f"- `catalogue/{name}`: `{source}`; licence: {licence}; derivation: {derivation}.")
    lines += ["", "## Holdout (not bundled; written by `--holdout DIR`)", ""]
    for name, source, note, _ in HOLDOUT:
        lines.append(f"- `distractor__{name}`: `{source}`; {note}.")
    # sections written by hand (from PRESERVED_FROM on) survive regeneration
    old = readme.read_text() if readme.exists() else ""
    kept = old[old.index(PRESERVED_FROM):] if PRESERVED_FROM in old else ""
    readme.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "catalogue", help="catalogue directory")
    ap.add_argument("--readme", type=Path, default=HERE / "README.md")
    ap.add_argument("--holdout", type=Path, help="also write the distractor holdout set here")
    ap.add_argument("--skip-catalogue", action="store_true", help="only write the holdout set")
    args = ap.parse_args()

    if not args.skip_catalogue:
        args.out.mkdir(parents=True, exist_ok=True)
        wanted = {name for name, *_ in CATALOGUE}
        for stale in args.out.iterdir():  # keep the directory exactly the listed set
            if stale.suffix in (".jpg", ".png") and stale.name not in wanted:
                stale.unlink()
        for name, *_, build in CATALOGUE:
            save(build(), args.out / name)
        total = write_readme(args.out, args.readme)
        print(f"catalogue: {len(CATALOGUE)} images, {total} bytes in {args.out}")
        assert total <= 4 * 1024 * 1024, "catalogue exceeds the 4 MB budget"
    if args.holdout:
        args.holdout.mkdir(parents=True, exist_ok=True)
        for name, *_, build in HOLDOUT:
            save(build(), args.holdout / f"distractor__{name}")
        print(f"holdout: {len(HOLDOUT)} distractors in {args.holdout}")


if __name__ == "__main__":
    main()
