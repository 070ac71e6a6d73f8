//! What `indexer` prints when its reader goes away: `indexer search … | head` must end
//! quietly (exit 0, nothing on stderr about the pipe), not with a panic.

use imageindex_e2e::*;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `indexer args…` with its standard output closed before it writes anything; returns
/// the exit code and stderr.
fn with_stdout_closed(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(bin("indexer"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_quiet(args: &[&str]) {
    let (code, stderr) = with_stdout_closed(args);
    assert_eq!(code, Some(0), "{args:?} with stdout closed: {stderr}");
    for noise in ["panicked", "Broken pipe", "\"level\":\"ERROR\""] {
        assert!(
            !stderr.contains(noise),
            "{args:?} printed {noise:?}: {stderr}"
        );
    }
    assert!(
        !stderr.lines().any(|l| l.starts_with("error:")),
        "{args:?} reported an error: {stderr}"
    );
}

#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let images = sample_subset(&ds, 4);
    let idx = tmp.path().join("idx");
    let o = build(&ds, &idx, "small", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let mut search = vec!["search".to_string(), path(&idx)];
    search.extend(images.iter().map(|p| path(p)));
    let search: Vec<&str> = search.iter().map(String::as_str).collect();
    let quiet = ["--log-format", "json"];
    assert_quiet(&[&search[..], &quiet[..]].concat());
    assert_quiet(&[&search[..], &["--json"], &quiet[..]].concat());
    assert_quiet(&["info", &path(&idx), "--log-format", "json"]);
    assert_quiet(&["scan", &path(&ds), "--log-format", "json"]);
}
