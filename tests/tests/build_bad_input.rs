//! Bad input never stops or corrupts a build: each bad file is skipped, counted and
//! recorded with its reason; a vanished dataset or a full disk ends the build with a clear
//! message and exit code, leaving the checkpoint to resume from.

use imageindex_e2e::*;
use std::path::Path;
use std::process::Command;

fn write_bad_files(dir: &Path) {
    let good = sample_subset(dir, 4);
    // truncated JPEG: the first half of a real one
    let bytes = std::fs::read(&good[0]).unwrap();
    std::fs::write(dir.join("truncated.jpg"), &bytes[..bytes.len() / 2]).unwrap();
    // zero bytes
    std::fs::write(dir.join("empty.jpg"), b"").unwrap();
    // text named .jpg
    std::fs::write(dir.join("notes.jpg"), b"this is a text file, not a photo\n").unwrap();
    // a PNG whose header claims 50,000 x 50,000 pixels (a decompression bomb)
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&50_000u32.to_be_bytes());
    png.extend_from_slice(&50_000u32.to_be_bytes());
    png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    png.extend_from_slice(b"\0\0\0\0IEND\xaeB`\x82");
    std::fs::write(dir.join("bomb.png"), &png).unwrap();
    // unreadable: a FIFO named like an image (reading it would block forever)
    let fifo = std::ffi::CString::new(dir.join("pipe.jpg").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // a symlink loop and a dangling link
    std::os::unix::fs::symlink(dir, dir.join("loop")).unwrap();
    std::os::unix::fs::symlink(dir.join("gone.jpg"), dir.join("dangling.jpg")).unwrap();
    // a non-UTF-8 file name
    let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"caf\xe9.jpg");
    std::fs::copy(&good[1], dir.join(name)).unwrap();
}

#[test]
fn every_bad_file_is_skipped_counted_and_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    write_bad_files(&ds);
    let out = tmp.path().join("idx");
    let o = build(&ds, &out, "small", &["--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json_of(&o);
    assert_eq!(s["meta"]["imagesIndexed"], 4);
    let info = json_of(&run("indexer", &["info", out.to_str().unwrap(), "--json"]));
    let failed = info["failed"].as_array().unwrap();
    let reason = |needle: &str| {
        failed
            .iter()
            .find(|f| f["path"].as_str().unwrap().contains(needle))
            .map(|f| f["reason"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{needle} not reported in {failed:?}"))
    };
    assert!(reason("truncated.jpg").contains("truncated"));
    assert!(reason("empty.jpg").contains("empty"));
    assert!(reason("notes.jpg").contains("not an image"));
    assert!(reason("bomb.png").contains("50000x50000"));
    assert!(reason("pipe.jpg").contains("not a regular file"));
    assert!(reason("loop").contains("symlink loop"));
    assert!(reason("dangling.jpg").contains("broken symlink"));
    assert!(reason("caf").contains("UTF-8"));
    assert_eq!(failed.len(), 8, "{failed:?}");
    assert_eq!(info["meta"]["imagesFailed"], 8);
    assert_eq!(info["meta"]["imagesTotal"], 12);
}

#[test]
fn a_vanished_dataset_stops_with_exit_code_3_and_resumes_later() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    make_photos(&ds, 24, 1600);
    let out = tmp.path().join("idx");
    let port = free_port();
    let mut child = build_command(&ds, &out, "small")
        .args(["--threads", "1"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let moved = tmp.path().join("moved");
    loop {
        if let Some(t) = http_get(port, "/metrics") {
            if metric(&t, "imageindex_images_processed_total").unwrap_or(0.0) >= 10.0 {
                std::fs::rename(&ds, &moved).unwrap();
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the dataset vanished"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("dataset"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.join("build/data.mdb").exists(),
        "the checkpoint must be kept"
    );
    std::fs::rename(&moved, &ds).unwrap();
    let o = build(&ds, &out, "small", &["--json"]);
    assert!(o.status.success());
    let s = json_of(&o);
    assert_eq!(s["resumed"], true);
    assert!(s["extractedNow"].as_u64().unwrap() < 24);
    assert_eq!(s["meta"]["imagesIndexed"], 24);
}

#[test]
fn a_full_disk_stops_with_exit_code_4_and_resumes_once_there_is_room() {
    if !cgroups_writable() {
        panic!("this test mounts a tmpfs: run the suite as root (CI does)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    make_photos(&ds, 20, 1200);
    let mnt = tmp.path().join("small-disk");
    std::fs::create_dir_all(&mnt).unwrap();
    let mount = |opts: &str| {
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs", mnt.to_str().unwrap()])
            .status()
            .unwrap()
    };
    assert!(mount("size=256k").success());
    let out = mnt.join("idx");
    let o = build(&ds, &out, "small", &[]);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    let remount = Command::new("mount")
        .args(["-o", "remount,size=256m", mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(remount.success());
    let o2 = build(&ds, &out, "small", &["--json"]);
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(o.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("disk"), "{stderr}");
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    assert_eq!(json_of(&o2)["meta"]["imagesIndexed"], 20);
}
