//! Support for the end-to-end tests: the built binaries, the bundled sample, scratch
//! directories, attacked images and real cgroups. Test-only code, not shipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod chart;
pub mod cluster;
pub mod controlplane;
pub mod prometheus;
pub mod provisioner;
pub mod real_node;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The bundled sample catalogue.
pub fn sample_catalogue() -> PathBuf {
    repo().join("samples/catalogue")
}

/// A built binary of the workspace (`indexer`, `operator`), next to the test executable's
/// target directory. The README's test command builds them first (`cargo build --bins`).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("IMAGEINDEX_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let p = profile_dir.join(name);
    assert!(
        p.is_file(),
        "{} is not built: run `cargo build --workspace --bins` before the tests",
        p.display()
    );
    p
}

/// Runs a binary with arguments and returns its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

/// The stdout of a finished command that must have succeeded; otherwise panics with `what`,
/// its stdout and its stderr.
pub fn stdout_of_success(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A copy of `n` sample images (sorted by name) in a fresh directory.
pub fn sample_subset(dir: &Path, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(sample_catalogue())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.truncate(n);
    files
        .iter()
        .map(|f| {
            let to = dir.join(f.file_name().unwrap());
            std::fs::copy(f, &to).unwrap();
            to
        })
        .collect()
}

/// Whether this process may create cgroups (root on a host with a memory controller).
pub fn cgroups_writable() -> bool {
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let root = if v1.join("cgroup.procs").exists() {
        v1.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    };
    // One name per call: tests running in parallel in one process probe at the same time.
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = root.join(format!("imageindex-probe-{}-{n}", std::process::id()));
    let ok = std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    ok
}

/// Parses a command's stdout as JSON, with its stderr in the panic message.
pub fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}); status {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Writes attacked copies of a catalogue image (rotation, crop, rescale, JPEG) to `dir`.
pub fn attacked_copies(image: &Path, dir: &Path) -> Vec<PathBuf> {
    use opencv::core::{Mat, Point2f, Rect, Scalar, Size, Vector};
    use opencv::prelude::*;
    use opencv::{imgcodecs, imgproc};
    std::fs::create_dir_all(dir).unwrap();
    let img = imgcodecs::imread(image.to_str().unwrap(), imgcodecs::IMREAD_COLOR).unwrap();
    let stem = image.file_stem().unwrap().to_str().unwrap().to_string();
    let (w, h) = (img.cols(), img.rows());
    let mut out = Vec::new();
    let mut save = |name: &str, m: &Mat, q: i32| {
        let p = dir.join(format!("{stem}__{name}.jpg"));
        let params = Vector::<i32>::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, q]);
        imgcodecs::imwrite(p.to_str().unwrap(), m, &params).unwrap();
        out.push(p);
    };
    let crop = Mat::roi(&img, Rect::new(w / 5, h / 6, w * 3 / 5, h * 3 / 5))
        .unwrap()
        .try_clone()
        .unwrap();
    save("crop", &crop, 90);
    let rot =
        imgproc::get_rotation_matrix_2d(Point2f::new(w as f32 / 2.0, h as f32 / 2.0), 20.0, 0.9)
            .unwrap();
    let mut rotated = Mat::default();
    imgproc::warp_affine(
        &img,
        &mut rotated,
        &rot,
        Size::new(w, h),
        imgproc::INTER_LINEAR,
        opencv::core::BORDER_CONSTANT,
        Scalar::all(0.0),
    )
    .unwrap();
    save("rotate", &rotated, 90);
    let mut small = Mat::default();
    imgproc::resize(
        &img,
        &mut small,
        Size::new(w / 2, h / 2),
        0.0,
        0.0,
        imgproc::INTER_AREA,
    )
    .unwrap();
    save("half_jpeg30", &small, 30);
    let mut mirrored = Mat::default();
    opencv::core::flip(&crop, &mut mirrored, 1).unwrap();
    save("mirror_crop", &mirrored, 80);
    out
}

/// The stem of the catalogue image an attacked copy (`<stem>__<attack>.jpg`) was made from.
pub fn original_stem(query: &Path) -> String {
    let stem = query.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    stem.split("__").next().unwrap_or(stem).to_string()
}

/// Writes `n` large textured photos (sample images upscaled to `width` px wide, with a little
/// sensor-like noise so every copy is distinct) as JPEGs; returns their paths.
pub fn make_photos(dir: &Path, n: usize, width: i32) -> Vec<PathBuf> {
    use opencv::core::{Mat, Scalar, Size, Vector};
    use opencv::prelude::*;
    use opencv::{imgcodecs, imgproc};
    std::fs::create_dir_all(dir).unwrap();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(sample_catalogue())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    sources.sort();
    let mut out = Vec::new();
    for i in 0..n {
        let src = &sources[i % sources.len()];
        let img = imgcodecs::imread(src.to_str().unwrap(), imgcodecs::IMREAD_COLOR).unwrap();
        let height = width * img.rows() / img.cols().max(1);
        let mut big = Mat::default();
        imgproc::resize(
            &img,
            &mut big,
            Size::new(width, height),
            0.0,
            0.0,
            imgproc::INTER_CUBIC,
        )
        .unwrap();
        let mut noise =
            Mat::new_rows_cols_with_default(height, width, big.typ(), Scalar::all(0.0)).unwrap();
        let mut rng = opencv::core::RNG::new(i as u64 + 7).unwrap();
        rng.fill(
            &mut noise,
            opencv::core::RNG_NORMAL,
            &Scalar::all(0.0),
            &Scalar::all(6.0),
            false,
        )
        .unwrap();
        let mut noisy = Mat::default();
        opencv::core::add(&big, &noise, &mut noisy, &opencv::core::no_array(), -1).unwrap();
        let p = dir.join(format!("photo_{i:03}.jpg"));
        let params = Vector::<i32>::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, 90]);
        imgcodecs::imwrite(p.to_str().unwrap(), &noisy, &params).unwrap();
        out.push(p);
    }
    out
}

/// A time as the API writes it (RFC 3339, whole seconds, UTC).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET on the loopback interface; the body, or `None` if unreachable.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The value of a Prometheus sample (`name` with its labels, e.g. `x{phase="extract"}`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// `indexer build DATASET --out OUT --preset PRESET` (add arguments to the command).
pub fn build_command(dataset: &Path, out: &Path, preset: &str) -> Command {
    let mut c = Command::new(bin("indexer"));
    c.arg("build")
        .arg(dataset)
        .arg("--out")
        .arg(out)
        .args(["--preset", preset]);
    c
}

/// Runs `indexer build` with extra arguments and returns its output.
pub fn build(dataset: &Path, out: &Path, preset: &str, extra: &[&str]) -> Output {
    build_command(dataset, out, preset)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("cannot run indexer build: {e}"))
}
