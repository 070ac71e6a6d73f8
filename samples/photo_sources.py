"""The openly licensed photos that the benchmark photo catalogue is cut from.

`samples/install_photo_sources.sh` unpacks the packages below into one directory (Debian
bookworm packages under `deb/<package>/`, the scikit-image wheel under `pypi/`); this module
lists the photos chosen from them, reads each one's licence from the package's own credits,
and loads the pixels. Only photographs (and a few photographed paintings and astronomical
images) are chosen; the few plain graphics (`kind="graphic"`: smooth gradients, a dark
aurora) exist only to make the catalogue's hard cases and are marked as such.

Licences come, most specific first, from:
  * GCompris: the README credits beside the images inside each activity's Qt resource
    (.rcc) file (author, Wikimedia Commons page, licence per file);
  * Stellarium nebulae: `textures.json` (`imageCredits` per texture);
  * Debian's machine-readable `copyright` file of the package (DEP-5 `Files:` stanzas,
    the last matching stanza wins);
  * scikit-image: the `skimage.data` docstrings (copied into SKIMAGE_LICENCES below).
"""
import fnmatch
import io
import json
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = None

DEFAULT_ROOT = Path("/var/cache/imageindex/photo-sources")

# Debian bookworm packages and the versions the published numbers were made with (the
# install script fetches exactly these).
DEBIAN_PACKAGES = {
    "plasma-workspace-wallpapers": "4:5.27.5-2",
    "mate-backgrounds": "1.26.0-1",
    "lomiri-wallpapers-16.04": "20.04.0-2",
    "lomiri-wallpapers-20.04": "20.04.0-2",
    "palapeli-data": "4:22.12.3-1",
    "gcompris-qt-data": "3.1-2",
    "opencv-doc": "4.6.0+dfsg-12",
    "stellarium-data": "0.22.2-1",
    "xfdesktop4-data": "4.18.1-1",
    "libelementary-data": "1.26.3-1",
}
SKIMAGE_VERSION = "0.26.0"

# Plasma wallpapers that are photographs (the others are digital art); each ships one
# photo at several sizes: the largest is used.
PLASMA_PHOTOS = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
                 "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am"]
OPENCV_PHOTOS = ["aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png",
                 "board.jpg", "box_in_scene.png", "building.jpg", "butterfly.jpg",
                 "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "leuvenA.jpg",
                 "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "pca_test1.jpg",
                 "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "starry_night.jpg",
                 "stuff.jpg", "sudoku.png", "text_defocus.jpg"]
# GCompris activities whose resources are photographs: (rcc file, member glob, kind).
GCOMPRIS_PHOTOS = [
    ("erase", "*/erase/resource/*.webp", "photo"),
    ("explore_farm_animals", "*/resource/animals/*.webp", "photo"),
    ("explore_world_animals", "*/resource/animals/*.webp", "photo"),
    ("explore_world_music", "*/resource/music/*.webp", "photo"),
    ("explore_monuments", "*/resource/*/*.webp", "photo"),
    ("details", "*/resource/image/*.webp", "photo"),
    ("clickgame", "*/resource/sea*", "photo"),
    ("solar_system", "*/resource/*.webp", "astro"),
    ("categorization", "*/images/fishes/*", "photo"),
    ("categorization", "*/images/monuments/*", "photo"),
    ("categorization", "*/images/renewable/*", "photo"),
    ("categorization", "*/images/tools/*", "product"),
    ("categorization", "*/images/others/*", "photo"),
]
# Stellarium landscapes that are photographs (panoramas; the others are drawn).
STELLARIUM_LANDSCAPES = ["mars/mars.png", "moon/apollo17.png",
                         "grossmugl/grossmugl_leeberg_crop11.25_2048.png",
                         "garching/garching-gl1.png", "garching/garching-gl2.png",
                         "garching/garching-gl3.png", "garching/garching-gl4.png"]
STELLARIUM_NEBULA_MIN_SIDE = 512
# Licences of the scikit-image sample photos, from the skimage.data docstrings.
SKIMAGE_LICENCES = {
    "astronaut.png": "public domain (NASA)",
    "brick.png": "CC0 (CC0Textures, Bricks25)",
    "camera.png": "CC0 (Lav Varshney)",
    "cell.png": "CC0",
    "chelsea.png": "CC0 (Stefan van der Walt)",
    "clock_motion.png": "public domain (Stefan van der Walt)",
    "coffee.png": "CC0 (Rachel Michetti)",
    "coins.png": "no known copyright restrictions (Brooklyn Museum)",
    "grass.png": "CC0 (linolafett, Grass-01)",
    "gravel.png": "CC0 (CC0Textures, Gravel04)",
    "hubble_deep_field.jpg": "public domain (NASA)",
    "ihc.png": "no known copyright restrictions (CMMI)",
    "moon.png": "BSD-3-Clause (scikit-image; no licence stated per image)",
    "motorcycle_left.png": "Middlebury 2014 stereo data set (no licence stated by scikit-image)",
    "retina.jpg": "CC0 1.0 (Mikael Haggstrom, Wikimedia Commons)",
    "rocket.jpg": "public domain (SpaceX)",
}
# Plain graphics kept only for hard cases (smooth gradients, a dark aurora).
GRAPHICS = [
    ("xfdesktop4-data", "usr/share/backgrounds/xfce/xfce-blue.jpg"),
    ("xfdesktop4-data", "usr/share/backgrounds/xfce/xfce-teal.jpg"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/desktop/Ubuntu-Mate-Dark-no-logo.png"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/desktop/GreenTraditional.jpg"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/umang_by_Abhishek_Mudgal.jpg"),
]


@dataclass
class Source:
    """One source photo: where it is, what it is, and under which licence."""
    id: str                 # stable, unique, file-name safe
    package: str            # Debian package or PyPI distribution
    version: str
    file: str               # path inside the package (rcc: "<rcc>.rcc:<member>")
    kind: str               # photo | product | astro | graphic
    licence: str
    credit: str = ""        # author / source page where the package names one
    width: int = 0
    height: int = 0
    loader: object = field(default=None, repr=False)  # () -> bytes of the encoded image

    def load(self):
        """(RGB uint8 array, alpha uint8 array or None). Grey sources come back as RGB."""
        im = Image.open(io.BytesIO(self.loader()))
        im.load()
        alpha = None
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            a = np.asarray(rgba)[..., 3]
            if a.min() < 250:
                alpha = a.copy()
            im = rgba
        rgb = np.ascontiguousarray(np.asarray(im.convert("RGB")))
        return rgb, alpha


# --------------------------------------------------------------------------- licences

def parse_dep5(text):
    """[(patterns, licence, copyright)] of a Debian machine-readable copyright file."""
    stanzas, cur, key = [], {}, None
    for line in text.splitlines() + [""]:
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, None
            continue
        if line[0] in " \t":
            if key:
                cur[key] += "\n" + line.strip()
            continue
        key, _, value = line.partition(":")
        cur[key] = value.strip()
    out = []
    for s in stanzas:
        if "Files" in s:
            pats = s["Files"].split()
            lic = s.get("License", "").splitlines()[0] if s.get("License") else ""
            cr = " ".join(s.get("Copyright", "").split())
            out.append((pats, lic, cr))
    return out


def dep5_licence(stanzas, path):
    """(licence, copyright) of `path` (relative to the upstream tree): last match wins."""
    found = ("", "")
    for pats, lic, cr in stanzas:
        if any(fnmatch.fnmatchcase(path, p) for p in pats):
            found = (lic, cr)
    if not found[0]:  # installed flat although listed under an upstream folder
        name = Path(path).name
        for pats, lic, cr in stanzas:
            if any(Path(p).name == name for p in pats):
                found = (lic, cr)
    return found


def parse_gcompris_readme(text):
    """{file name: (licence, credit)} from a GCompris resource README (blank-line blocks
    of `Copyright:`, `License:`, `Source:`, `Files:` followed by the file names)."""
    out = {}
    for block in re.split(r"\n\s*\n", text):
        fields, files, in_files = {}, [], False
        for line in block.splitlines():
            m = re.match(r"^(Copyright|License|Licence|Source|Comments?|Files?)\s*:\s*(.*)$", line.strip())
            if m:
                k = m.group(1).lower()
                in_files = k.startswith("file")
                if in_files:
                    files += m.group(2).split()
                else:
                    fields[k] = m.group(2).strip()
            elif in_files and line.strip():
                files += line.split()
        lic = fields.get("license") or fields.get("licence", "")
        credit = "; ".join(v for v in (fields.get("copyright"), fields.get("source")) if v)
        for f in files:
            out[Path(f).name] = (lic, credit)
    return out


# --------------------------------------------------------------------------- Qt .rcc

def read_rcc(buf):
    """{path: bytes} of every file in a Qt resource (.rcc) file (formats 1-3, zlib)."""
    if buf[:4] != b"qres":
        raise ValueError("not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", buf[4:20])
    node_size = 14 if version == 1 else 22
    files = {}

    def name_at(off):
        (n,) = struct.unpack(">H", buf[names + off:names + off + 2])
        return buf[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        i, prefix = stack.pop()
        base = tree + i * node_size
        name_off, flags = struct.unpack(">IH", buf[base:base + 6])
        path = f"{prefix}/{name_at(name_off)}" if i else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", buf[base + 6:base + 14])
            stack += [(c, path) for c in range(first, first + count)]
            continue
        (doff,) = struct.unpack(">I", buf[base + 10:base + 14])
        (size,) = struct.unpack(">I", buf[data + doff:data + doff + 4])
        blob = buf[data + doff + 4:data + doff + 4 + size]
        if flags & 1:
            blob = zlib.decompress(blob[4:])
        elif flags & 4:
            raise ValueError(f"{path}: zstd-compressed resource, not supported")
        files[path.lstrip("/")] = blob
    return files


# --------------------------------------------------------------------------- discovery

def _size_of(blob_or_path):
    src = io.BytesIO(blob_or_path) if isinstance(blob_or_path, bytes) else blob_or_path
    with Image.open(src) as im:
        return im.size


def _file_source(root, package, rel, kind, stanzas, sid, licence=None, credit=None):
    path = root / "deb" / package / rel
    lic, cr = dep5_licence(stanzas, rel.split("/", 3)[-1] if rel.startswith("usr/share/") else rel)
    w, h = _size_of(path)
    return Source(id=sid, package=package, version=DEBIAN_PACKAGES[package], file=rel, kind=kind,
                  licence=licence or lic, credit=credit if credit is not None else cr,
                  width=w, height=h, loader=path.read_bytes)


def _copyright(root, package):
    p = root / "deb" / package / "usr/share/doc" / package / "copyright"
    return parse_dep5(p.read_text(errors="replace")) if p.exists() else []


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _plasma(root):
    pkg = "plasma-workspace-wallpapers"
    st = _copyright(root, pkg)
    out = []
    for name in PLASMA_PHOTOS:
        d = root / "deb" / pkg / "usr/share/wallpapers" / name / "contents/images"
        best = max(sorted(d.iterdir()), key=lambda p: (np.prod(_size_of(p)), p.name))
        rel = str(best.relative_to(root / "deb" / pkg))
        out.append(_file_source(root, pkg, rel, "photo", st, f"plasma-{_slug(name)}",
                                credit="KDE Visual Design Group"))
    return out


def _globbed(root, package, pattern, kind, prefix):
    st = _copyright(root, package)
    base = root / "deb" / package
    out = []
    for p in sorted(base.glob(pattern)):
        rel = str(p.relative_to(base))
        lic, cr = dep5_licence(st, rel)
        if not lic:  # DEP-5 paths are relative to the upstream tree, not to /usr/share/...
            for cut in range(1, rel.count("/") + 1):
                lic, cr = dep5_licence(st, rel.split("/", cut)[-1])
                if lic:
                    break
        w, h = _size_of(p)
        out.append(Source(id=f"{prefix}-{_slug(p.stem)}", package=package,
                          version=DEBIAN_PACKAGES[package], file=rel, kind=kind,
                          licence=lic, credit=cr, width=w, height=h, loader=p.read_bytes))
    return out


def _opencv(root):
    pkg = "opencv-doc"
    st = _copyright(root, pkg)
    lic, cr = dep5_licence(st, "samples/data/x.jpg")
    base = "usr/share/doc/opencv-doc/examples/data/"
    return [_file_source(root, pkg, base + f, "photo", st, f"opencv-{_slug(Path(f).stem)}",
                         licence=lic, credit="OpenCV samples/data; " + cr[:80])
            for f in OPENCV_PHOTOS]


def _gcompris(root):
    pkg = "gcompris-qt-data"
    st = _copyright(root, pkg)
    rcc_dir = next((root / "deb" / pkg).rglob("rcc"))
    out, seen = [], set()
    cache = {}
    for rcc, pattern, kind in GCOMPRIS_PHOTOS:
        if rcc not in cache:
            cache[rcc] = read_rcc((rcc_dir / f"{rcc}.rcc").read_bytes())
        files = cache[rcc]
        readmes = {}
        for member in sorted(files):
            if not fnmatch.fnmatchcase(member, pattern):
                continue
            if Path(member).suffix.lower() not in (".webp", ".png", ".jpg", ".jpeg"):
                continue
            blob = files[member]
            w, h = _size_of(blob)
            if w * h < 150 * 150:
                continue
            d = str(Path(member).parent)
            if d not in readmes:
                txt = files.get(d + "/README", b"").decode("utf-8", "replace")
                readmes[d] = parse_gcompris_readme(txt)
            lic, credit = readmes[d].get(Path(member).name, ("", ""))
            if not lic:
                lic, credit = dep5_licence(st, member.split("/", 1)[-1])
            sid = f"gcompris-{_slug(rcc)}-{_slug(Path(member).parent.name)}-{_slug(Path(member).stem)}"
            if sid in seen:
                continue
            seen.add(sid)
            out.append(Source(id=sid, package=pkg, version=DEBIAN_PACKAGES[pkg],
                              file=f"{rcc}.rcc:{member}", kind=kind, licence=lic, credit=credit,
                              width=w, height=h, loader=(lambda b=blob: b)))
    return out


def _sky_boxes_overlap(a, b):
    (ra0, ra1, de0, de1), (rb0, rb1, db0, db1) = a, b
    return ra0 < rb1 and rb0 < ra1 and de0 < db1 and db0 < de1


def _stellarium(root):
    pkg = "stellarium-data"
    st = _copyright(root, pkg)
    base = root / "deb" / pkg / "usr/share/stellarium"
    out = [_file_source(root, pkg, f"usr/share/stellarium/landscapes/{f}", "photo", st,
                        f"stellarium-{_slug(f.split('/')[-1].split('.')[0])}")
           for f in STELLARIUM_LANDSCAPES]
    # Nebula textures: skip any whose sky footprint overlaps one already taken, so no two
    # show the same stars.
    text = (base / "nebulae/default/textures.json").read_text()
    text = re.sub(r"(?<=[\[,\s])(-?)\.(\d)", r"\g<1>0.\2", text)  # ".5" is not JSON
    tex = json.loads(text)
    taken = []
    for t in tex["subTiles"]:
        f = base / "nebulae/default" / t["imageUrl"]
        if not f.exists():
            continue
        w, h = _size_of(f)
        if min(w, h) < STELLARIUM_NEBULA_MIN_SIDE:
            continue
        pts = np.array(t["worldCoords"][0], float)
        ra = pts[:, 0]
        if ra.max() - ra.min() > 180:  # wraps around RA 0
            ra = np.where(ra > 180, ra - 360, ra)
        box = (ra.min(), ra.max(), pts[:, 1].min(), pts[:, 1].max())
        if any(_sky_boxes_overlap(box, b) for b in taken):
            continue
        taken.append(box)
        cred = t.get("imageCredits", {})
        credit = "; ".join(str(v) for k, v in cred.items() if k.lower() in ("short", "infourl"))
        rel = str(f.relative_to(root / "deb" / pkg))
        lic, _ = dep5_licence(st, rel)
        out.append(Source(id=f"stellarium-{_slug(f.stem)}", package=pkg, version=DEBIAN_PACKAGES[pkg],
                          file=rel, kind="astro", licence=lic, credit=credit, width=w, height=h,
                          loader=f.read_bytes))
    return out


def _skimage(root):
    wheels = sorted((root / "pypi").glob(f"scikit_image-{SKIMAGE_VERSION}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no scikit-image {SKIMAGE_VERSION} wheel in {root / 'pypi'}")
    zf = zipfile.ZipFile(wheels[0])
    out = []
    for name, lic in sorted(SKIMAGE_LICENCES.items()):
        blob = zf.read(f"skimage/data/{name}")
        w, h = _size_of(blob)
        out.append(Source(id=f"skimage-{_slug(Path(name).stem)}", package="scikit-image (PyPI)",
                          version=SKIMAGE_VERSION, file=f"skimage/data/{name}", kind="photo",
                          licence=lic, width=w, height=h, loader=(lambda b=blob: b)))
    return out


def _graphics(root):
    out = []
    for pkg, rel in GRAPHICS:
        st = _copyright(root, pkg)
        src = _file_source(root, pkg, rel, "graphic", st, f"graphic-{_slug(Path(rel).stem)}")
        if not src.licence:
            for cut in range(1, rel.count("/") + 1):
                src.licence, src.credit = dep5_licence(st, rel.split("/", cut)[-1])
                if src.licence:
                    break
        out.append(src)
    return out


def discover(root=DEFAULT_ROOT):
    """Every chosen source under `root`, in a stable order, ids unique."""
    root = Path(root)
    missing = [p for p in DEBIAN_PACKAGES if not (root / "deb" / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"photo sources missing in {root}: {', '.join(missing)} "
            "(run samples/install_photo_sources.sh)")
    srcs = []
    srcs += _plasma(root)
    srcs += _globbed(root, "mate-backgrounds", "usr/share/backgrounds/mate/nature/*.jpg", "photo", "mate")
    srcs += [s for s in _globbed(root, "lomiri-wallpapers-16.04", "usr/share/backgrounds/*.jpg", "photo", "lomiri")
             if "umang" not in s.file]
    srcs += _globbed(root, "lomiri-wallpapers-20.04", "usr/share/backgrounds/Kleiber*.jpg", "photo", "lomiri")
    srcs += _globbed(root, "palapeli-data", "usr/share/palapeli/collection/*.jpg", "photo", "palapeli")
    srcs += _globbed(root, "libelementary-data", "usr/share/elementary/images/*.jpg", "photo", "efl")
    srcs += _opencv(root)
    srcs += _skimage(root)
    srcs += _gcompris(root)
    srcs += _stellarium(root)
    srcs += _graphics(root)
    ids = [s.id for s in srcs]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"duplicate source ids: {sorted(dup)}")
    return srcs


def installed_versions(root=DEFAULT_ROOT):
    """{package: version actually unpacked} (from the install script's stamp files)."""
    root = Path(root)
    out = {}
    for p in DEBIAN_PACKAGES:
        stamp = root / "deb" / f"{p}.version"
        out[p] = stamp.read_text().strip() if stamp.exists() else None
    wheels = sorted((root / "pypi").glob("scikit_image-*.whl"))
    out["scikit-image (PyPI)"] = wheels[0].name.split("-")[1] if wheels else None
    return out


if __name__ == "__main__":
    import collections
    import sys
    srcs = discover(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ROOT)
    by = collections.Counter((s.package, s.kind) for s in srcs)
    area = collections.Counter()
    for s in srcs:
        area[s.package] += s.width * s.height
    for (pkg, kind), n in sorted(by.items()):
        print(f"{pkg:32} {kind:8} {n:4}  {area[pkg] / 1e6:8.1f} MP (package)")
    print(f"total {len(srcs)} sources, {sum(area.values()) / 1e6:.1f} MP")
    for s in srcs:
        if not s.licence:
            print("NO LICENCE:", s.id, s.file)
